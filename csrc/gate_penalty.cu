// Kernels of the polarprune_C::gate_penalty ops (schemas: registration.cpp; semantics:
// polarprune_cuda/ops/reference.py). Launches on the current stream, every launch checked.
#include "gate_common.cuh"

namespace polarprune {
namespace {

struct PenaltyArgs {
  int64_t n;
  int64_t num_segments;
  int64_t num_pairs;
  double cst, total, tau, rho, tw, pw, t;
  int form;
  bool split;  // gate bank: write gates and keep the two gradients apart
};

// One block walks the whole score vector: sums, segment sums, bilinear terms,
// the loss and terms, then the gradient. Shared memory: the reduction buffer,
// then num_segments segment sums and num_segments marginal costs.
// __launch_bounds__: a block of kReduceThreads threads may use at most 64 registers per thread; without the
// bound the compiler may use more (the float64 version) and the launch fails.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kReduceThreads, 1)
    penalty_kernel(const scalar_t* __restrict__ s, const acc_t* __restrict__ w, const int64_t* __restrict__ off,
                   const int64_t* __restrict__ pairs, const acc_t* __restrict__ coef, scalar_t* __restrict__ grad,
                   scalar_t* __restrict__ grad_polar, scalar_t* __restrict__ gates, acc_t* __restrict__ loss_out,
                   acc_t* __restrict__ terms_out, PenaltyArgs a) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* buf = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* seg_sum = buf + blockDim.x;
  acc_t* marginal = seg_sum + a.num_segments;
  const acc_t tau = acc_t(a.tau);
  const int64_t n = a.n;

  acc_t wp = 0, sp = 0, bi = 0, bad = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    acc_t si = static_cast<acc_t>(s[i]);
    acc_t p = sigmoid_of(si, tau);
    wp += w[i] * p;
    sp += p;
    bi += acc_t(4) * p * (acc_t(1) - p);
    bad += isfinite(si) ? acc_t(0) : acc_t(1);
  }
  wp = block_sum(wp, buf);
  sp = block_sum(sp, buf);
  bi = block_sum(bi, buf);
  bad = block_sum(bad, buf);
  const acc_t mean_p = sp / acc_t(n);

  // segment sums: warp w sums segments w, w + 32, ... (a fixed assignment and a fixed shuffle order, so
  // deterministic) with no block-wide barrier per segment
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int64_t k = warp; k < a.num_segments; k += warps) {
    acc_t part = 0;
    for (int64_t i = off[k] + lane; i < off[k + 1]; i += 32) part += sigmoid_of(acc_t(s[i]), tau);
    for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
    if (lane == 0) {
      seg_sum[k] = part;
      marginal[k] = 0;
    }
  }
  __syncthreads();

  acc_t sum_abs = 0, sum_sgn = 0;
  if (a.form == kPolarZhuang) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      acc_t c = sigmoid_of(acc_t(s[i]), tau) - mean_p;
      sum_abs += fabs(c);
      sum_sgn += c > acc_t(0) ? acc_t(1) : (c < acc_t(0) ? acc_t(-1) : acc_t(0));
    }
    sum_abs = block_sum(sum_abs, buf);
    sum_sgn = block_sum(sum_sgn, buf);
  }

  // bilinear terms: serial over the (few) pairs, in a fixed order
  if (threadIdx.x == 0) {
    acc_t quad = 0;
    for (int64_t l = 0; l < a.num_pairs; ++l) {
      int64_t pa = pairs[2 * l], pb = pairs[2 * l + 1];
      acc_t c = coef[l];
      quad += c * seg_sum[pa] * seg_sum[pb];
      marginal[pa] += c * seg_sum[pb];
      marginal[pb] += c * seg_sum[pa];
    }
    buf[0] = quad;
  }
  __syncthreads();
  const acc_t quad = buf[0];
  __syncthreads();

  const acc_t density = (acc_t(a.cst) + wp + quad) / acc_t(a.total);
  const acc_t diff = density - acc_t(a.rho);
  const acc_t target_term = diff * diff;
  acc_t polar_term, mean_sgn = 0;
  if (a.form == kPolarZhuang) {
    polar_term = (acc_t(a.t) * sp - sum_abs) / acc_t(n);
    mean_sgn = sum_sgn / acc_t(n);
  } else {
    polar_term = bi / acc_t(n);
  }
  if (threadIdx.x == 0) {
    if (!a.split) loss_out[0] = acc_t(a.tw) * target_term + acc_t(a.pw) * polar_term;
    terms_out[0] = density;
    terms_out[1] = target_term;
    terms_out[2] = polar_term;
    terms_out[3] = bad;
  }

  const acc_t scale = acc_t(2) / acc_t(a.total) * diff;
  const int64_t segments = a.num_segments > 0 ? a.num_segments : 1;
  for (int64_t k = 0; k < segments; ++k) {
    const int64_t lo = a.num_segments > 0 ? off[k] : 0;
    const int64_t hi = a.num_segments > 0 ? off[k + 1] : n;
    const acc_t m = a.num_segments > 0 ? marginal[k] : acc_t(0);
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      acc_t si = static_cast<acc_t>(s[i]);
      acc_t p = sigmoid_of(si, tau);
      acc_t dp = p * (acc_t(1) - p) / tau;
      acc_t g_target = scale * (w[i] + m) * dp;
      acc_t g_polar;
      if (a.form == kPolarZhuang) {
        acc_t c = p - mean_p;
        acc_t sgn = c > acc_t(0) ? acc_t(1) : (c < acc_t(0) ? acc_t(-1) : acc_t(0));
        g_polar = (acc_t(a.t) - sgn + mean_sgn) / acc_t(n) * dp;
      } else {
        g_polar = acc_t(4) * (acc_t(1) - acc_t(2) * p) / acc_t(n) * dp;
      }
      if (a.split) {
        gates[i] = si > acc_t(0) ? scalar_t(1) : scalar_t(0);
        grad[i] = static_cast<scalar_t>(g_target);
        grad_polar[i] = static_cast<scalar_t>(g_polar);
      } else {
        grad[i] = static_cast<scalar_t>(acc_t(a.tw) * g_target + acc_t(a.pw) * g_polar);
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> launch_penalty(
    const at::Tensor& scores, const at::Tensor& cost, const at::Tensor& seg_offsets, const at::Tensor& pairs,
    const at::Tensor& pair_coef, int64_t num_segments, double cst, double total, double tau, double rho, double tw,
    double pw, c10::string_view polar_form, double t, bool split) {
  check_cuda(scores, "scores");
  const c10::cuda::CUDAGuard guard(scores.device());
  const bool has_pairs = pairs.numel() > 0;
  auto s = scores.contiguous();
  const auto acc_dtype = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto w = cost.to(acc_dtype).contiguous();  // costs and coefficients in the accumulation type (float64 stays)
  auto off = has_pairs ? seg_offsets.contiguous() : seg_offsets;
  auto pr = pairs.contiguous();
  auto cf = pair_coef.to(acc_dtype).contiguous();
  auto loss = at::empty({}, scores.options().dtype(acc_dtype));
  auto terms = at::empty({4}, scores.options().dtype(acc_dtype));
  auto grad = at::empty_like(s);
  auto grad_polar = split ? at::empty_like(s) : grad;
  auto gates = split ? at::empty_like(s) : grad;
  PenaltyArgs a{s.numel(), has_pairs ? num_segments : 0, has_pairs ? pairs.size(0) : 0, cst, total, tau, rho, tw, pw,
                t, polar_code(polar_form), split};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "polarprune_penalty", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    size_t smem = (kReduceThreads + 2 * a.num_segments) * sizeof(acc_t);
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(penalty_kernel<scalar_t, acc_t>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    penalty_kernel<scalar_t, acc_t><<<1, kReduceThreads, smem, stream>>>(
        s.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), has_pairs ? off.data_ptr<int64_t>() : nullptr,
        has_pairs ? pr.data_ptr<int64_t>() : nullptr, has_pairs ? cf.data_ptr<acc_t>() : nullptr,
        grad.data_ptr<scalar_t>(), grad_polar.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
        loss.data_ptr<acc_t>(), terms.data_ptr<acc_t>(), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad, terms, gates, grad_polar};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_penalty_cuda(
    const at::Tensor& scores, const at::Tensor& cost, const at::Tensor& seg_offsets, const at::Tensor& pairs,
    const at::Tensor& pair_coef, int64_t num_segments, double cst, double total, double tau, double rho,
    double target_weight, double polar_weight, c10::string_view polar_form, double t) {
  auto out = launch_penalty(scores, cost, seg_offsets, pairs, pair_coef, num_segments, cst, total, tau, rho,
                            target_weight, polar_weight, polar_form, t, false);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

}  // namespace polarprune
