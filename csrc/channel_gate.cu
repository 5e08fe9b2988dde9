// Kernels of the polarprune_C::channel_gate, channel_gate_backward ops (schemas: registration.cpp; semantics:
// polarprune_cuda/ops/reference.py). Launches on the current stream, every launch checked.
#include "gate_common.cuh"

namespace polarprune {
namespace {

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

}  // namespace

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

}  // namespace polarprune
