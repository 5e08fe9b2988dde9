// Shared by the CUDA kernels of polarprune_cuda (one .cu file per op): includes, launch
// sizes, argument checks, the device helpers more than one op uses (sigmoid, STE gradient,
// fixed-order block reduction) and the penalty launcher shared by gate_penalty and gate_bank.
// Kernels have the semantics and signatures of polarprune_cuda/ops/reference.py. Reductions
// are deterministic: fixed-order block reductions, and per-program partial sums reduced over
// a fixed axis.
#pragma once
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
#include "gate_codes.h"
#include "gate_ops.h"
#include "launch_grids.h"

namespace polarprune {

// kThreads, kReduceThreads and every launch grid: launch_grids.h (pure host functions, tested without a GPU)
inline int blocks_for(int64_t n) { return static_cast<int>(elementwise_blocks(n)); }

inline std::vector<int64_t> channel_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return shape;
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
}

template <typename acc_t>
__device__ acc_t sigmoid_of(acc_t s, acc_t tau) {
  return acc_t(1) / (acc_t(1) + exp(-s / tau));
}

template <typename scalar_t, typename acc_t>
__device__ acc_t ste_grad(acc_t dg, acc_t s, int mode, acc_t tau) {
  if (mode == kSteClipped) return fabs(s) <= acc_t(1) ? dg : acc_t(0);
  if (mode == kSteSigmoid) {
    acc_t p = sigmoid_of(s, tau);
    return dg * p * (acc_t(1) - p) / tau;
  }
  return dg;
}

// VEC consecutive elements loaded or stored as one access (16 bytes at most); the caller checks alignment.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

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

// Penalty value, gradient and terms in one single-block launch (gate_penalty.cu); with split, also the
// hard gates and the target and polar gradients apart (gate_bank). Returns (loss, grad or grad_target,
// terms, gates, grad_polar).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> launch_penalty(
    const at::Tensor& scores, const at::Tensor& cost, const at::Tensor& seg_offsets, const at::Tensor& pairs,
    const at::Tensor& pair_coef, int64_t num_segments, double cst, double total, double tau, double rho, double tw,
    double pw, c10::string_view polar_form, double t, bool split);

}  // namespace polarprune
