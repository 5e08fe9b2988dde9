// Launch grids of the CUDA kernels as small pure host functions (no CUDA headers), so that their
// arithmetic can be checked on a machine without a GPU: polarprune_cuda._C.launch_grid exposes them
// (tests/ops/test_launch_grids.py checks every hardware limit and the coverage of every element).
//
// Hardware limits (every architecture this project builds for): gridDim.x <= 2^31 - 1, gridDim.y and
// gridDim.z <= 65535, at most 1024 threads per block. Kernels walk their grid with grid-stride loops,
// so a grid clamped to these limits still covers every element.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace polarprune {

constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int kThreads = 256;         // threads per block of the elementwise and channel-gate kernels
constexpr int kReduceThreads = 1024;  // threads of the one-block penalty kernel
constexpr int64_t kElementwiseBlocks = 65535LL * 8;  // grid-stride beyond this many blocks
constexpr int64_t kTargetBlocks = 1024;  // backward: blocks enough to fill a GPU; more only multiply partial sums

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t pow2_at_least(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Elementwise kernels over n elements: one thread per element, grid-stride beyond kElementwiseBlocks.
inline int64_t elementwise_blocks(int64_t n) {
  const int64_t b = ceil_div(n, kThreads);
  return b < 1 ? 1 : (b > kElementwiseBlocks ? kElementwiseBlocks : b);
}

// The channel-gate kernels address a tensor as R rows of L inner elements, the inner dimension being the
// one with the smallest stride: NCHW-like tensors are N*C rows (one per (n, c) plane) of HW elements, the
// gate indexed by row; channels_last-like tensors (channel stride 1) are N*HW rows of C channels, the gate
// indexed by the inner element. Threads of a block form rows_per_block groups of threads_per_row threads;
// each thread handles vec consecutive inner elements per tile.
struct ChannelGateGrid {
  int64_t rows = 0, inner = 0, row_div = 1;  // R, L, and D: a row r is (r / D, r % D)
  int64_t vec = 1;                           // elements per thread and tile (vector loads when > 1)
  int64_t threads_per_row = 1, rows_per_block = 1;
  int64_t row_blocks = 0, tiles = 0;         // blocks of rows, tiles of the inner dimension
  int64_t grid_x = 1, grid_y = 1;            // the launch grid (grid-stride over row_blocks and tiles)
  int64_t partial_rows = 0;                  // backward: rows of the partial-sum buffer (partial_rows x ...)
  bool gate_inner = false;
};

// n, c, hw: the tensor as (N, C, HW); channels_fast: channel stride 1 (and C > 1); vec: the vector width
// the tensors allow (1 if unaligned); backward: the grid of the fused backward (dx and the dg partial sums).
inline ChannelGateGrid channel_gate_grid(int64_t n, int64_t c, int64_t hw, bool channels_fast, int64_t vec,
                                         bool backward) {
  if (n < 0 || c < 0 || hw < 0 || vec < 1) throw std::invalid_argument("channel_gate_grid: negative size or vec < 1");
  ChannelGateGrid g;
  g.gate_inner = channels_fast;
  g.rows = channels_fast ? n * hw : n * c;
  g.inner = channels_fast ? c : hw;
  g.row_div = channels_fast ? hw : c;
  if (g.row_div < 1) g.row_div = 1;
  g.vec = vec;
  const int64_t per_row = ceil_div(g.inner, vec);
  g.threads_per_row = pow2_at_least(per_row < 1 ? 1 : per_row);
  if (g.threads_per_row > kThreads) g.threads_per_row = kThreads;
  g.rows_per_block = kThreads / g.threads_per_row;
  g.row_blocks = ceil_div(g.rows, g.rows_per_block);
  g.tiles = ceil_div(g.inner, g.threads_per_row * vec);
  if (g.rows == 0 || g.inner == 0) {
    g.row_blocks = g.tiles = 0;
    return g;
  }
  if (!backward) {
    g.grid_x = g.row_blocks < kMaxGridX ? g.row_blocks : kMaxGridX;
    g.grid_y = g.tiles < kMaxGridYZ ? g.tiles : kMaxGridYZ;
    return g;
  }
  if (channels_fast) {
    // every tile of channels keeps its own accumulators: one grid row per tile, no grid-stride over tiles
    if (g.tiles > kMaxGridYZ)
      throw std::invalid_argument("channel_gate_backward: " + std::to_string(c) +
                                  " channels in a channels_last tensor exceed the launch grid (at most " +
                                  std::to_string(kMaxGridYZ * kThreads * vec) + ")");
    g.grid_y = g.tiles;
    const int64_t want = ceil_div(kTargetBlocks, g.grid_y);
    g.grid_x = g.row_blocks < want ? g.row_blocks : want;
    g.partial_rows = g.grid_x;  // partial: (grid_x, C)
  } else {
    const int64_t want = ceil_div(kTargetBlocks, g.row_blocks);
    int64_t gy = g.tiles < want ? g.tiles : want;
    g.grid_y = gy < kMaxGridYZ ? gy : kMaxGridYZ;
    g.grid_x = g.row_blocks < kMaxGridX ? g.row_blocks : kMaxGridX;
    g.partial_rows = g.grid_y;  // partial: (grid_y, N * C)
  }
  return g;
}

}  // namespace polarprune
