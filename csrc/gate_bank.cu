// Kernels of the polarprune_C::gate_bank, gate_bank_backward ops (schemas: registration.cpp; semantics:
// polarprune_cuda/ops/reference.py). Launches on the current stream, every launch checked.
#include "gate_common.cuh"

namespace polarprune {
namespace {

// gradient of the bank op: ste'(s) * dgates + dterms[1] * grad_target + dterms[2] * grad_polar
template <typename scalar_t, typename terms_t>
__global__ void gate_bank_bwd_kernel(const scalar_t* __restrict__ dg, const terms_t* __restrict__ dterms,
                                     const scalar_t* __restrict__ s, const scalar_t* __restrict__ gt,
                                     const scalar_t* __restrict__ gp, scalar_t* __restrict__ ds, int64_t n, int mode,
                                     double tau) {
  using acc_t = at::acc_type<scalar_t, true>;
  const acc_t d_target = static_cast<acc_t>(dterms[1]);
  const acc_t d_polar = static_cast<acc_t>(dterms[2]);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    acc_t v = ste_grad<scalar_t, acc_t>(static_cast<acc_t>(dg[i]), static_cast<acc_t>(s[i]), mode, acc_t(tau));
    v += d_target * static_cast<acc_t>(gt[i]) + d_polar * static_cast<acc_t>(gp[i]);
    ds[i] = static_cast<scalar_t>(v);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_bank_cuda(
    const at::Tensor& scores, c10::string_view ste, const at::Tensor& cost, const at::Tensor& seg_offsets,
    const at::Tensor& pairs, const at::Tensor& pair_coef, int64_t num_segments, double cst, double total, double tau,
    double rho, c10::string_view polar_form, double t) {
  ste_code(ste);
  auto out = launch_penalty(scores, cost, seg_offsets, pairs, pair_coef, num_segments, cst, total, tau, rho, 1.0,
                            1.0, polar_form, t, true);
  return {std::get<3>(out), std::get<2>(out), std::get<1>(out), std::get<4>(out)};
}

at::Tensor gate_bank_backward_cuda(const at::Tensor& grad_gates, const at::Tensor& grad_terms,
                                   const at::Tensor& scores, const at::Tensor& grad_target,
                                   const at::Tensor& grad_polar, c10::string_view ste, double tau) {
  check_cuda(scores, "scores");
  const int mode = ste_code(ste);
  const c10::cuda::CUDAGuard guard(scores.device());
  auto s = scores.contiguous();
  auto dg = grad_gates.to(s.scalar_type()).contiguous();
  auto gt = grad_target.contiguous();
  auto gp = grad_polar.contiguous();
  auto dt = grad_terms.contiguous();
  auto ds = at::empty_like(s);
  const int64_t n = s.numel();
  if (n == 0) return ds;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "polarprune_gate_bank_bwd", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    auto dtc = dt.to(s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    gate_bank_bwd_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dg.data_ptr<scalar_t>(), dtc.data_ptr<acc_t>(), s.data_ptr<scalar_t>(), gt.data_ptr<scalar_t>(),
        gp.data_ptr<scalar_t>(), ds.data_ptr<scalar_t>(), n, mode, tau);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return ds;
}

}  // namespace polarprune
