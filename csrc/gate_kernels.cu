// CUDA kernels of polarprune_cuda: the same ops, semantics and signatures as
// polarprune_cuda/ops/reference.py. Every kernel launches on the current stream and
// every launch is checked. Reductions are deterministic: fixed-order block
// reductions, and per-program partial sums reduced over a fixed axis.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <string>
#include <tuple>
#include <vector>

#include "gate_ops.h"

namespace polarprune {
namespace {

constexpr int kThreads = 256;
constexpr int kReduceThreads = 1024;

int ste_code(c10::string_view ste) {
  if (ste == "identity") return 0;
  if (ste == "clipped") return 1;
  if (ste == "sigmoid") return 2;
  TORCH_CHECK(false, "ste must be one of identity, clipped, sigmoid, got ", std::string(ste));
}

int polar_code(c10::string_view form) {
  if (form == "zhuang") return 0;
  if (form == "bimodal") return 1;
  TORCH_CHECK(false, "polar_form must be one of zhuang, bimodal, got ", std::string(form));
}

int blocks_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 8 ? (b < 1 ? 1 : b) : 65535 * 8);
}

std::vector<int64_t> channel_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return shape;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
}

template <typename acc_t>
__device__ acc_t sigmoid_of(acc_t s, acc_t tau) {
  return acc_t(1) / (acc_t(1) + exp(-s / tau));
}

// ------------------------------------------------------------------ gate bank

template <typename scalar_t>
__global__ void binary_gate_kernel(const scalar_t* __restrict__ s, scalar_t* __restrict__ g, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    g[i] = static_cast<float>(s[i]) > 0.f ? scalar_t(1) : scalar_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__device__ acc_t ste_grad(acc_t dg, acc_t s, int mode, acc_t tau) {
  if (mode == 1) return fabs(s) <= acc_t(1) ? dg : acc_t(0);
  if (mode == 2) {
    acc_t p = sigmoid_of(s, tau);
    return dg * p * (acc_t(1) - p) / tau;
  }
  return dg;
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

// ------------------------------------------------------------------ penalty (one block)

// Fixed-order tree reduction over the block; every thread gets the result.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* buf) {
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) buf[threadIdx.x] += buf[threadIdx.x + stride];
    __syncthreads();
  }
  acc_t out = buf[0];
  __syncthreads();
  return out;
}

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
template <typename scalar_t, typename acc_t>
__global__ void penalty_kernel(const scalar_t* __restrict__ s, const float* __restrict__ w,
                               const int64_t* __restrict__ off, const int64_t* __restrict__ pairs,
                               const float* __restrict__ coef, scalar_t* __restrict__ grad,
                               scalar_t* __restrict__ grad_polar, scalar_t* __restrict__ gates,
                               acc_t* __restrict__ loss_out, acc_t* __restrict__ terms_out, PenaltyArgs a) {
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
    wp += acc_t(w[i]) * p;
    sp += p;
    bi += acc_t(4) * p * (acc_t(1) - p);
    bad += isfinite(si) ? acc_t(0) : acc_t(1);
  }
  wp = block_sum(wp, buf);
  sp = block_sum(sp, buf);
  bi = block_sum(bi, buf);
  bad = block_sum(bad, buf);
  const acc_t mean_p = sp / acc_t(n);

  for (int64_t k = 0; k < a.num_segments; ++k) {
    acc_t part = 0;
    for (int64_t i = off[k] + threadIdx.x; i < off[k + 1]; i += blockDim.x) part += sigmoid_of(acc_t(s[i]), tau);
    part = block_sum(part, buf);
    if (threadIdx.x == 0) {
      seg_sum[k] = part;
      marginal[k] = 0;
    }
  }
  __syncthreads();

  acc_t sum_abs = 0, sum_sgn = 0;
  if (a.form == 0) {
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
      acc_t c = acc_t(coef[l]);
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
  if (a.form == 0) {
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
      acc_t g_target = scale * (acc_t(w[i]) + m) * dp;
      acc_t g_polar;
      if (a.form == 0) {
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> launch_penalty(
    const at::Tensor& scores, const at::Tensor& cost, const at::Tensor& seg_offsets, const at::Tensor& pairs,
    const at::Tensor& pair_coef, int64_t num_segments, double cst, double total, double tau, double rho, double tw,
    double pw, c10::string_view polar_form, double t, bool split) {
  check_cuda(scores, "scores");
  const c10::cuda::CUDAGuard guard(scores.device());
  const bool has_pairs = pairs.numel() > 0;
  auto s = scores.contiguous();
  auto w = cost.to(at::kFloat).contiguous();
  auto off = has_pairs ? seg_offsets.contiguous() : seg_offsets;
  auto pr = pairs.contiguous();
  auto cf = pair_coef.to(at::kFloat).contiguous();
  const auto acc_dtype = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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
        s.data_ptr<scalar_t>(), w.data_ptr<float>(), has_pairs ? off.data_ptr<int64_t>() : nullptr,
        has_pairs ? pr.data_ptr<int64_t>() : nullptr, has_pairs ? cf.data_ptr<float>() : nullptr,
        grad.data_ptr<scalar_t>(), grad_polar.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
        loss.data_ptr<acc_t>(), terms.data_ptr<acc_t>(), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad, terms, gates, grad_polar};
}

// ------------------------------------------------------------------ activation gate

struct View3 {  // a tensor addressed as (N, C, HW)
  int64_t sn, sc, shw;
};

bool view3(const at::Tensor& x, View3& v, int64_t& hw) {
  hw = 1;
  for (int64_t d = 2; d < x.dim(); ++d) hw *= x.size(d);
  v.sn = x.stride(0);
  v.sc = x.stride(1);
  v.shw = 1;
  int64_t expected = -1;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) == 1) continue;
    if (expected < 0) {
      v.shw = x.stride(d);
      expected = x.stride(d) * x.size(d);
    } else {
      if (x.stride(d) != expected) return false;
      expected *= x.size(d);
    }
  }
  return true;
}

template <typename scalar_t, bool CHANNELS_FAST>
__global__ void channel_gate_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                    scalar_t* __restrict__ y, int64_t N, int64_t C, int64_t HW, View3 vx, View3 vy) {
  const int64_t total = N * C * HW;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(blockDim.x) * gridDim.x) {
    int64_t n, c, hw;
    if (CHANNELS_FAST) {
      c = i % C;
      hw = (i / C) % HW;
      n = i / (C * HW);
    } else {
      hw = i % HW;
      c = (i / HW) % C;
      n = i / (C * HW);
    }
    const float gc = static_cast<float>(g[c]);
    scalar_t out = scalar_t(0);
    if (gc != 0.f) out = static_cast<scalar_t>(static_cast<float>(x[n * vx.sn + c * vx.sc + hw * vx.shw]) * gc);
    y[n * vy.sn + c * vy.sc + hw * vy.shw] = out;  // closed channels: zeros, x not read
  }
}

// NCHW-like: one block per (c, n); threads walk the HW plane.
template <typename scalar_t>
__global__ void channel_gate_bwd_planes(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ g, scalar_t* __restrict__ dx,
                                        float* __restrict__ partial, int64_t C, int64_t HW, View3 vdy, View3 vx,
                                        View3 vdx) {
  __shared__ float buf[kThreads];
  const int64_t c = blockIdx.x, n = blockIdx.y;
  const float gc = static_cast<float>(g[c]);
  float acc = 0.f;
  for (int64_t hw = threadIdx.x; hw < HW; hw += blockDim.x) {
    const float d = static_cast<float>(dy[n * vdy.sn + c * vdy.sc + hw * vdy.shw]);
    acc += d * static_cast<float>(x[n * vx.sn + c * vx.sc + hw * vx.shw]);
    dx[n * vdx.sn + c * vdx.sc + hw * vdx.shw] = static_cast<scalar_t>(d * gc);
  }
  acc = block_sum(acc, buf);
  if (threadIdx.x == 0) partial[n * C + c] = acc;
}

// channels_last-like: block (tile, n); each thread owns channels and walks the tile's positions.
template <typename scalar_t>
__global__ void channel_gate_bwd_tiles(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                       const scalar_t* __restrict__ g, scalar_t* __restrict__ dx,
                                       float* __restrict__ partial, int64_t C, int64_t HW, int64_t tile, View3 vdy,
                                       View3 vx, View3 vdx) {
  const int64_t t = blockIdx.x, n = blockIdx.y;
  const int64_t lo = t * tile, hi = (lo + tile < HW) ? lo + tile : HW;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float gc = static_cast<float>(g[c]);
    float acc = 0.f;
    for (int64_t hw = lo; hw < hi; ++hw) {
      const float d = static_cast<float>(dy[n * vdy.sn + c * vdy.sc + hw * vdy.shw]);
      acc += d * static_cast<float>(x[n * vx.sn + c * vx.sc + hw * vx.shw]);
      dx[n * vdx.sn + c * vdx.sc + hw * vdx.shw] = static_cast<scalar_t>(d * gc);
    }
    partial[(n * gridDim.x + t) * C + c] = acc;
  }
}

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

// ------------------------------------------------------------------ host functions

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_penalty_cuda(
    const at::Tensor& scores, const at::Tensor& cost, const at::Tensor& seg_offsets, const at::Tensor& pairs,
    const at::Tensor& pair_coef, int64_t num_segments, double cst, double total, double tau, double rho,
    double target_weight, double polar_weight, c10::string_view polar_form, double t) {
  auto out = launch_penalty(scores, cost, seg_offsets, pairs, pair_coef, num_segments, cst, total, tau, rho,
                            target_weight, polar_weight, polar_form, t, false);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

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

at::Tensor channel_gate_cuda(const at::Tensor& x, const at::Tensor& gate) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  View3 vx, vy;
  int64_t hw, hw2;
  auto g = gate.to(x.scalar_type()).contiguous();
  if (!view3(x, vx, hw) || !view3(y, vy, hw2)) {  // spatial dims not addressable with one stride
    at::mul_out(y, x, g.view(channel_shape(x)));
    return y;
  }
  const at::Tensor& xs = x;
  const int64_t N = x.size(0), C = x.size(1), total = N * C * hw;
  if (total == 0) return y;
  const bool channels_fast = vx.sc == 1 && C > 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "polarprune_channel_gate", [&] {
    auto stream = c10::cuda::getCurrentCUDAStream();
    if (channels_fast) {
      channel_gate_kernel<scalar_t, true><<<blocks_for(total), kThreads, 0, stream>>>(
          xs.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), N, C, hw, vx, vy);
    } else {
      channel_gate_kernel<scalar_t, false><<<blocks_for(total), kThreads, 0, stream>>>(
          xs.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), N, C, hw, vx, vy);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> channel_gate_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                              const at::Tensor& gate) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dy = grad.to(x.scalar_type());
  const at::Tensor& xs = x;
  View3 vdy, vx, vdx;
  int64_t hw, hw2, hw3;
  auto dx = at::empty_like(grad);
  auto g = gate.to(x.scalar_type()).contiguous();
  if (!view3(dy, vdy, hw) || !view3(xs, vx, hw2) || !view3(dx, vdx, hw3)) {
    at::mul_out(dx, dy, g.view(channel_shape(x)));
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
    auto dgate = at::mul(dy.to(at::kFloat), x.to(at::kFloat)).sum(dims);
    return {dx, dgate.to(gate.scalar_type())};
  }
  const int64_t N = x.size(0), C = x.size(1);
  if (N * C * hw == 0) return {dx, at::zeros_like(gate)};
  const bool tiles = vx.sc == 1 && C > 1;
  const int64_t tile = 64;
  const int64_t rows = tiles ? N * ((hw + tile - 1) / tile) : N;
  auto partial = at::empty({rows, C}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "polarprune_channel_gate_bwd", [&] {
    auto stream = c10::cuda::getCurrentCUDAStream();
    if (tiles) {
      dim3 grid(static_cast<unsigned>((hw + tile - 1) / tile), static_cast<unsigned>(N));
      channel_gate_bwd_tiles<scalar_t><<<grid, kThreads, 0, stream>>>(
          dy.data_ptr<scalar_t>(), xs.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
          partial.data_ptr<float>(), C, hw, tile, vdy, vx, vdx);
    } else {
      dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(N));
      channel_gate_bwd_planes<scalar_t><<<grid, kThreads, 0, stream>>>(
          dy.data_ptr<scalar_t>(), xs.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
          partial.data_ptr<float>(), C, hw, vdy, vx, vdx);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, partial.sum(0).to(gate.scalar_type())};
}

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

int64_t cuda_runtime_version_built() { return CUDART_VERSION; }

}  // namespace polarprune
