// Kernels of the polarprune_C::gated_affine, gated_affine_backward ops (schemas: registration.cpp; semantics:
// polarprune_cuda/ops/reference.py). Launches on the current stream, every launch checked.
#include "gate_common.cuh"

namespace polarprune {
namespace {

// ------------------------------------------------------------------ gated affine

template <typename scalar_t>
__global__ void gated_affine_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ b,
                                    const scalar_t* __restrict__ g, scalar_t* __restrict__ wo,
                                    scalar_t* __restrict__ bo, int64_t C) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < C; i += int64_t(blockDim.x) * gridDim.x) {
    using acc_t = at::acc_type<scalar_t, true>;
    const acc_t gi = static_cast<acc_t>(g[i]);
    wo[i] = static_cast<scalar_t>(static_cast<acc_t>(w[i]) * gi);
    bo[i] = static_cast<scalar_t>(static_cast<acc_t>(b[i]) * gi);
  }
}

template <typename scalar_t>
__global__ void gated_affine_bwd_kernel(const scalar_t* __restrict__ gw, const scalar_t* __restrict__ gb,
                                        const scalar_t* __restrict__ w, const scalar_t* __restrict__ b,
                                        const scalar_t* __restrict__ g, scalar_t* __restrict__ dw,
                                        scalar_t* __restrict__ db, scalar_t* __restrict__ dg, int64_t C) {
  using acc_t = at::acc_type<scalar_t, true>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < C; i += int64_t(blockDim.x) * gridDim.x) {
    const acc_t gi = static_cast<acc_t>(g[i]);
    dw[i] = static_cast<scalar_t>(static_cast<acc_t>(gw[i]) * gi);
    db[i] = static_cast<scalar_t>(static_cast<acc_t>(gb[i]) * gi);
    dg[i] = static_cast<scalar_t>(static_cast<acc_t>(gw[i]) * static_cast<acc_t>(w[i]) +
                                  static_cast<acc_t>(gb[i]) * static_cast<acc_t>(b[i]));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gated_affine_cuda(const at::Tensor& weight, const at::Tensor& bias,
                                                     const at::Tensor& gate) {
  check_cuda(weight, "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  auto w = weight.contiguous(), b = bias.to(weight.scalar_type()).contiguous();
  auto g = gate.to(weight.scalar_type()).contiguous();
  auto wo = at::empty_like(w), bo = at::empty_like(b);
  const int64_t C = w.numel();
  if (C == 0) return {wo, bo};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "polarprune_gated_affine", [&] {
    gated_affine_kernel<scalar_t><<<blocks_for(C), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), wo.data_ptr<scalar_t>(),
        bo.data_ptr<scalar_t>(), C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {wo, bo};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_affine_backward_cuda(const at::Tensor& grad_weight,
                                                                          const at::Tensor& grad_bias,
                                                                          const at::Tensor& weight,
                                                                          const at::Tensor& bias,
                                                                          const at::Tensor& gate) {
  check_cuda(weight, "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto st = weight.scalar_type();
  auto gw = grad_weight.to(st).contiguous(), gb = grad_bias.to(st).contiguous();
  auto w = weight.contiguous(), b = bias.to(st).contiguous(), g = gate.to(st).contiguous();
  auto dw = at::empty_like(w), db = at::empty_like(b), dg = at::empty_like(g);
  const int64_t C = w.numel();
  if (C > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "polarprune_gated_affine_bwd", [&] {
      gated_affine_bwd_kernel<scalar_t><<<blocks_for(C), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          gw.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
          g.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), db.data_ptr<scalar_t>(), dg.data_ptr<scalar_t>(), C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {dw, db, dg.to(gate.scalar_type())};
}

}  // namespace polarprune
