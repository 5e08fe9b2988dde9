// Kernels of the polarprune_C::channel_gate, channel_gate_backward ops (schemas: registration.cpp; semantics:
// polarprune_cuda/ops/reference.py). Launches on the current stream, every launch checked.
//
// A tensor is addressed as R rows of L inner elements (launch_grids.h: ChannelGateGrid): NCHW-like tensors
// as N*C planes of HW elements, channels_last-like ones as N*HW rows of C channels. Every element is read
// and multiplied, closed channels included (x * 0 is NaN for a NaN x, as in the reference); arithmetic and
// the dg sums are in acc_t (float for half, bfloat16 and float, double for double). One division per row,
// none per element; 16-byte vector accesses where every tensor's inner stride is 1 and its rows are aligned.
#include "gate_common.cuh"

namespace polarprune {
namespace {

struct RowView {  // element (row r = (a, b), inner i) at a * sa + b * sb + i * si
  int64_t sa, sb, si;
};

struct Shape {
  int64_t rows, inner, row_div, tpr, rpb, row_blocks, tiles;
};

// (N, C, HW) strides of x, or false if its spatial dims cannot be walked with one stride.
bool view3(const at::Tensor& x, int64_t& sn, int64_t& sc, int64_t& shw, int64_t& hw) {
  hw = 1;
  for (int64_t d = 2; d < x.dim(); ++d) hw *= x.size(d);
  sn = x.stride(0);
  sc = x.dim() > 1 ? x.stride(1) : 1;
  shw = 1;
  int64_t expected = -1;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) == 1) continue;
    if (expected < 0) {
      shw = x.stride(d);
      expected = x.stride(d) * x.size(d);
    } else {
      if (x.stride(d) != expected) return false;
      expected *= x.size(d);
    }
  }
  return true;
}

bool row_view(const at::Tensor& t, bool gate_inner, RowView& v) {
  int64_t sn, sc, shw, hw;
  if (!view3(t, sn, sc, shw, hw)) return false;
  v = gate_inner ? RowView{sn, shw, sc} : RowView{sn, sc, shw};
  return true;
}

// The vector width every tensor allows: inner stride 1, row strides and L multiples of it, 16-byte aligned.
int64_t vec_width(std::initializer_list<std::pair<const at::Tensor*, RowView>> ts, int64_t inner, int64_t elem) {
  int64_t vec = 16 / elem;
  while (vec > 1) {
    bool ok = inner % vec == 0;
    for (const auto& tv : ts) {
      const RowView& v = tv.second;
      ok = ok && v.si == 1 && v.sa % vec == 0 && v.sb % vec == 0 &&
           reinterpret_cast<uintptr_t>(tv.first->data_ptr()) % (vec * elem) == 0;
    }
    if (ok) return vec;
    vec /= 2;
  }
  return 1;
}

// 16-byte accesses (VEC * sizeof(scalar_t) == 16 whenever VEC > 1) as one int4 load or store
template <typename scalar_t, int VEC>
__device__ __forceinline__ Vec<scalar_t, VEC> load_vec(const scalar_t* p) {
  static_assert(VEC * sizeof(scalar_t) == 16, "vector accesses are 16 bytes");
  union {
    int4 raw;
    Vec<scalar_t, VEC> v;
  } u;
  u.raw = __ldg(reinterpret_cast<const int4*>(p));
  return u.v;
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_vec(scalar_t* p, const Vec<scalar_t, VEC>& v) {
  union {
    int4 raw;
    Vec<scalar_t, VEC> v;
  } u;
  u.v = v;
  __stwb(reinterpret_cast<int4*>(p), u.raw);  // one st.global.v4 (a plain assignment was split in four)
}

// VEC elements of the fused backward: dx = dy * g written as one vector, sums[v] += dy * x.
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void backward_vec(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const acc_t* gates,
                                             acc_t* sums) {
  const Vec<scalar_t, VEC> dv = load_vec<scalar_t, VEC>(dy);
  const Vec<scalar_t, VEC> xv = load_vec<scalar_t, VEC>(x);
  Vec<scalar_t, VEC> ov;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const acc_t d = static_cast<acc_t>(dv.v[v]);
    sums[v] += d * static_cast<acc_t>(xv.v[v]);
    ov.v[v] = static_cast<scalar_t>(d * gates[v]);
  }
  store_vec<scalar_t, VEC>(dx, ov);
}

// r / d for a row index: 32-bit division where the rows fit (64-bit division is a slow subroutine call)
__device__ __forceinline__ int64_t row_of(int64_t r, int64_t d, int64_t rows) {
  return rows <= 0xffffffffLL ? int64_t(uint32_t(r) / uint32_t(d)) : r / d;
}

Shape shape_of(const ChannelGateGrid& g) {
  return Shape{g.rows, g.inner, g.row_div, g.threads_per_row, g.rows_per_block, g.row_blocks, g.tiles};
}

template <typename scalar_t, typename acc_t, bool GATE_INNER, int VEC>
__global__ void __launch_bounds__(kThreads)
    channel_gate_fwd(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, scalar_t* __restrict__ y,
                     Shape s, RowView vx, RowView vy) {
  const int64_t lane = threadIdx.x % s.tpr, sub = threadIdx.x / s.tpr;
  for (int64_t rb = blockIdx.x; rb < s.row_blocks; rb += gridDim.x) {
    const int64_t r = rb * s.rpb + sub;
    if (r >= s.rows) continue;
    const int64_t a = row_of(r, s.row_div, s.rows), b = r - a * s.row_div;
    const scalar_t* xr = x + a * vx.sa + b * vx.sb;
    scalar_t* yr = y + a * vy.sa + b * vy.sb;
    const acc_t grow = GATE_INNER ? acc_t(0) : static_cast<acc_t>(g[b]);
    for (int64_t tile = blockIdx.y; tile < s.tiles; tile += gridDim.y) {
      const int64_t i0 = (tile * s.tpr + lane) * VEC;
      if (i0 >= s.inner) continue;
      if constexpr (VEC > 1) {  // the host checked: inner stride 1, L % VEC == 0, aligned rows
        const Vec<scalar_t, VEC> xv = load_vec<scalar_t, VEC>(xr + i0);
        Vec<scalar_t, VEC> gvec;
        if constexpr (GATE_INNER) gvec = load_vec<scalar_t, VEC>(g + i0);  // the host checked g's alignment too
        Vec<scalar_t, VEC> yv;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const acc_t gv = GATE_INNER ? static_cast<acc_t>(gvec.v[v]) : grow;
          yv.v[v] = static_cast<scalar_t>(static_cast<acc_t>(xv.v[v]) * gv);
        }
        store_vec<scalar_t, VEC>(yr + i0, yv);
      } else {
        const acc_t gv = GATE_INNER ? static_cast<acc_t>(g[i0]) : grow;
        yr[i0 * vy.si] = static_cast<scalar_t>(static_cast<acc_t>(xr[i0 * vx.si]) * gv);
      }
    }
  }
}

// NCHW-like backward: the threads of a row reduce its dy * x in a fixed order; partial[blockIdx.y][r].
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    channel_gate_bwd_rows(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                          const scalar_t* __restrict__ g, scalar_t* __restrict__ dx, acc_t* __restrict__ partial,
                          Shape s, RowView vdy, RowView vx, RowView vdx) {
  __shared__ acc_t buf[kThreads];
  const int64_t lane = threadIdx.x % s.tpr, sub = threadIdx.x / s.tpr;
  for (int64_t rb = blockIdx.x; rb < s.row_blocks; rb += gridDim.x) {  // uniform across the block
    const int64_t r = rb * s.rpb + sub;
    acc_t acc = 0;
    if (r < s.rows) {
      const int64_t a = row_of(r, s.row_div, s.rows), b = r - a * s.row_div;
      const scalar_t* dyr = dy + a * vdy.sa + b * vdy.sb;
      const scalar_t* xr = x + a * vx.sa + b * vx.sb;
      scalar_t* dxr = dx + a * vdx.sa + b * vdx.sb;
      const acc_t gc = static_cast<acc_t>(g[b]);
      for (int64_t tile = blockIdx.y; tile < s.tiles; tile += gridDim.y) {
        const int64_t i0 = (tile * s.tpr + lane) * VEC;
        if (i0 >= s.inner) continue;
        if constexpr (VEC > 1) {
          acc_t sums[VEC] = {}, gates[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) gates[v] = gc;
          backward_vec<scalar_t, acc_t, VEC>(dyr + i0, xr + i0, dxr + i0, gates, sums);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc += sums[v];
        } else {
          const acc_t d = static_cast<acc_t>(dyr[i0 * vdy.si]);
          acc += d * static_cast<acc_t>(xr[i0 * vx.si]);
          dxr[i0 * vdx.si] = static_cast<scalar_t>(d * gc);
        }
      }
    }
    buf[threadIdx.x] = acc;
    __syncthreads();
    for (int64_t half = s.tpr / 2; half > 0; half >>= 1) {
      if (lane < half) buf[threadIdx.x] += buf[threadIdx.x + half];
      __syncthreads();
    }
    if (lane == 0 && r < s.rows) partial[blockIdx.y * s.rows + r] = buf[threadIdx.x];
    __syncthreads();
  }
}

// channels_last-like backward: each thread keeps VEC channel sums over the rows it visits; the block sums
// its row groups in a fixed order; partial[blockIdx.x][c]. One grid row (blockIdx.y) per tile of channels.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    channel_gate_bwd_channels(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                              const scalar_t* __restrict__ g, scalar_t* __restrict__ dx,
                              acc_t* __restrict__ partial, Shape s, RowView vdy, RowView vx, RowView vdx) {
  __shared__ acc_t buf[kThreads * VEC];
  const int64_t lane = threadIdx.x % s.tpr, sub = threadIdx.x / s.tpr;
  const int64_t c0 = (blockIdx.y * s.tpr + lane) * VEC;
  acc_t acc[VEC];
  acc_t gv[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    acc[v] = 0;
    gv[v] = c0 + v < s.inner ? static_cast<acc_t>(g[c0 + v]) : acc_t(0);
  }
  if (c0 < s.inner) {
    for (int64_t rb = blockIdx.x; rb < s.row_blocks; rb += gridDim.x) {
      const int64_t r = rb * s.rpb + sub;
      if (r >= s.rows) continue;
      const int64_t a = row_of(r, s.row_div, s.rows), b = r - a * s.row_div;
      const scalar_t* dyr = dy + a * vdy.sa + b * vdy.sb;
      const scalar_t* xr = x + a * vx.sa + b * vx.sb;
      scalar_t* dxr = dx + a * vdx.sa + b * vdx.sb;
      if constexpr (VEC > 1) {
        backward_vec<scalar_t, acc_t, VEC>(dyr + c0, xr + c0, dxr + c0, gv, acc);
      } else {
        const acc_t d = static_cast<acc_t>(dyr[c0 * vdy.si]);
        acc[0] += d * static_cast<acc_t>(xr[c0 * vx.si]);
        dxr[c0 * vdx.si] = static_cast<scalar_t>(d * gv[0]);
      }
    }
  }
  const int64_t width = s.tpr * VEC;
#pragma unroll
  for (int v = 0; v < VEC; ++v) buf[sub * width + lane * VEC + v] = acc[v];
  __syncthreads();
  for (int64_t k = threadIdx.x; k < width; k += blockDim.x) {
    acc_t total = 0;
    for (int64_t j = 0; j < s.rpb; ++j) total += buf[j * width + k];
    const int64_t c = blockIdx.y * width + k;
    if (c < s.inner) partial[blockIdx.x * s.inner + c] = total;
  }
}

template <typename scalar_t, typename acc_t, bool GATE_INNER>
void launch_fwd(const at::Tensor& x, const at::Tensor& g, at::Tensor& y, const ChannelGateGrid& grid,
                RowView vx, RowView vy) {
  const dim3 blocks(static_cast<unsigned>(grid.grid_x), static_cast<unsigned>(grid.grid_y));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* xp = x.data_ptr<scalar_t>();
  const auto* gp = g.data_ptr<scalar_t>();
  auto* yp = y.data_ptr<scalar_t>();
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (grid.vec == kVec) {
    channel_gate_fwd<scalar_t, acc_t, GATE_INNER, kVec><<<blocks, kThreads, 0, stream>>>(xp, gp, yp, shape_of(grid),
                                                                                       vx, vy);
  } else {
    channel_gate_fwd<scalar_t, acc_t, GATE_INNER, 1><<<blocks, kThreads, 0, stream>>>(xp, gp, yp, shape_of(grid),
                                                                                    vx, vy);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void launch_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& g, at::Tensor& dx, at::Tensor& partial,
                const ChannelGateGrid& grid, RowView vdy, RowView vx, RowView vdx) {
  const dim3 blocks(static_cast<unsigned>(grid.grid_x), static_cast<unsigned>(grid.grid_y));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* dyp = dy.data_ptr<scalar_t>();
  const auto* xp = x.data_ptr<scalar_t>();
  const auto* gp = g.data_ptr<scalar_t>();
  auto* dxp = dx.data_ptr<scalar_t>();
  auto* pp = partial.data_ptr<acc_t>();
  constexpr int kVec = 16 / sizeof(scalar_t);
  const Shape s = shape_of(grid);
  if (grid.gate_inner) {
    if (grid.vec == kVec)
      channel_gate_bwd_channels<scalar_t, acc_t, kVec><<<blocks, kThreads, 0, stream>>>(dyp, xp, gp, dxp, pp, s, vdy,
                                                                                      vx, vdx);
    else
      channel_gate_bwd_channels<scalar_t, acc_t, 1><<<blocks, kThreads, 0, stream>>>(dyp, xp, gp, dxp, pp, s, vdy, vx,
                                                                                   vdx);
  } else {
    if (grid.vec == kVec)
      channel_gate_bwd_rows<scalar_t, acc_t, kVec><<<blocks, kThreads, 0, stream>>>(dyp, xp, gp, dxp, pp, s, vdy, vx,
                                                                                  vdx);
    else
      channel_gate_bwd_rows<scalar_t, acc_t, 1><<<blocks, kThreads, 0, stream>>>(dyp, xp, gp, dxp, pp, s, vdy, vx,
                                                                               vdx);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool channels_fast_of(const at::Tensor& x) { return x.dim() > 1 && x.stride(1) == 1 && x.size(1) > 1; }

int64_t spatial_size(const at::Tensor& x) {
  int64_t hw = 1;
  for (int64_t d = 2; d < x.dim(); ++d) hw *= x.size(d);
  return hw;
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

at::Tensor channel_gate_cuda(const at::Tensor& x, const at::Tensor& gate) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  auto g = gate.to(x.scalar_type()).contiguous();
  const bool fast = channels_fast_of(x);
  RowView vx, vy;
  if (!row_view(x, fast, vx) || !row_view(y, fast, vy)) {  // spatial dims not addressable with one stride
    at::mul_out(y, x, g.view(channel_shape(x)));
    return y;
  }
  if (x.numel() == 0) return y;
  const RowView vg{0, 0, 1};  // the gate: read as a vector along the channels when they are the inner dim
  const int64_t vec = fast ? vec_width({{&x, vx}, {&y, vy}, {&g, vg}}, x.size(1), x.element_size())
                           : vec_width({{&x, vx}, {&y, vy}}, spatial_size(x), x.element_size());
  const auto grid = channel_gate_grid(x.size(0), x.size(1), spatial_size(x), fast, vec, false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "polarprune_channel_gate", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    if (fast)
      launch_fwd<scalar_t, acc_t, true>(x, g, y, grid, vx, vy);
    else
      launch_fwd<scalar_t, acc_t, false>(x, g, y, grid, vx, vy);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> channel_gate_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                              const at::Tensor& gate) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dy = grad.to(x.scalar_type());
  auto dx = at::empty_like(dy);
  auto g = gate.to(x.scalar_type()).contiguous();
  const auto acc = acc_type_of(x.scalar_type());
  const bool fast = channels_fast_of(x);
  RowView vdy, vx, vdx;
  if (!row_view(dy, fast, vdy) || !row_view(x, fast, vx) || !row_view(dx, fast, vdx)) {
    at::mul_out(dx, dy, g.view(channel_shape(x)));
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
    auto dgate = at::mul(dy.to(acc), x.to(acc)).sum(dims);
    return {dx, dgate.to(gate.scalar_type())};
  }
  const int64_t N = x.size(0), C = x.size(1), hw = spatial_size(x);
  if (x.numel() == 0) return {dx, at::zeros_like(gate)};
  const int64_t vec = vec_width({{&dy, vdy}, {&x, vx}, {&dx, vdx}}, fast ? C : hw, x.element_size());
  const auto grid = channel_gate_grid(N, C, hw, fast, vec, true);
  // partial sums: (grid_x, C) for channels_last, (grid_y, N * C) for NCHW; summed over a fixed axis
  auto partial = fast ? at::empty({grid.partial_rows, C}, x.options().dtype(acc))
                      : at::empty({grid.partial_rows * N, C}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "polarprune_channel_gate_bwd", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    launch_bwd<scalar_t, acc_t>(dy, x, g, dx, partial, grid, vdy, vx, vdx);
  });
  return {dx, partial.sum(0).to(gate.scalar_type())};
}

}  // namespace polarprune
