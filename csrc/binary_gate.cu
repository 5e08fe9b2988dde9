// Kernels of the polarprune_C::binary_gate, binary_gate_backward ops (schemas: registration.cpp; semantics:
// polarprune_cuda/ops/reference.py). Launches on the current stream, every launch checked.
#include "gate_common.cuh"

namespace polarprune {
namespace {

template <typename scalar_t>
__global__ void binary_gate_kernel(const scalar_t* __restrict__ s, scalar_t* __restrict__ g, int64_t n) {
  using acc_t = at::acc_type<scalar_t, true>;  // double stays double: 1e-300 > 0 must not round to 0
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    g[i] = static_cast<acc_t>(s[i]) > acc_t(0) ? scalar_t(1) : scalar_t(0);
  }
}

template <typename scalar_t>
__global__ void binary_gate_bwd_kernel(const scalar_t* __restrict__ dg, const scalar_t* __restrict__ s,
                                       scalar_t* __restrict__ ds, int64_t n, int mode, double tau) {
  using acc_t = at::acc_type<scalar_t, true>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    ds[i] = static_cast<scalar_t>(
        ste_grad<scalar_t, acc_t>(static_cast<acc_t>(dg[i]), static_cast<acc_t>(s[i]), mode, acc_t(tau)));
  }
}

}  // namespace

at::Tensor binary_gate_cuda(const at::Tensor& scores, c10::string_view ste, double tau) {
  check_cuda(scores, "scores");
  ste_code(ste);
  const c10::cuda::CUDAGuard guard(scores.device());
  auto s = scores.contiguous();
  auto g = at::empty_like(s);
  const int64_t n = s.numel();
  if (n == 0) return g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "polarprune_binary_gate", [&] {
    binary_gate_kernel<scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        s.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return g;
}

at::Tensor binary_gate_backward_cuda(const at::Tensor& grad, const at::Tensor& scores, c10::string_view ste,
                                     double tau) {
  check_cuda(scores, "scores");
  const int mode = ste_code(ste);
  const c10::cuda::CUDAGuard guard(scores.device());
  auto s = scores.contiguous();
  auto dg = grad.to(s.scalar_type()).contiguous();
  auto ds = at::empty_like(s);
  const int64_t n = s.numel();
  if (n == 0) return ds;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "polarprune_binary_gate_bwd", [&] {
    binary_gate_bwd_kernel<scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dg.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), ds.data_ptr<scalar_t>(), n, mode, tau);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return ds;
}

}  // namespace polarprune
