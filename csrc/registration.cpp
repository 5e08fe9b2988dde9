// Registers the CUDA kernels (csrc/<op>.cu) as the polarprune_C ops. The public op schemas
// (polarprune::*) are defined in Python (polarprune_cuda/ops/<op>.py); their implementation
// calls these ops when the backend registry picks the extension. The schemas below must be
// the same (names, argument names and types, returns): tests/ops/test_op_schemas.py checks it.
#include <cuda_runtime_api.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "gate_ops.h"
#include "launch_grids.h"

TORCH_LIBRARY(polarprune_C, m) {
  m.def("binary_gate(Tensor scores, str ste, float tau) -> Tensor");
  m.def("binary_gate_backward(Tensor grad, Tensor scores, str ste, float tau) -> Tensor");
  m.def(
      "gate_penalty(Tensor scores, Tensor cost, Tensor seg_offsets, Tensor pairs, Tensor pair_coef, int num_segments, "
      "float const, float total, float tau, float rho, float target_weight, float polar_weight, str polar_form, "
      "float t) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gate_bank(Tensor scores, str ste, Tensor cost, Tensor seg_offsets, Tensor pairs, Tensor pair_coef, "
      "int num_segments, float const, float total, float tau, float rho, str polar_form, float t) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gate_bank_backward(Tensor grad_gates, Tensor grad_terms, Tensor scores, Tensor grad_target, "
      "Tensor grad_polar, str ste, float tau) -> Tensor");
  m.def("channel_gate(Tensor x, Tensor gate) -> Tensor");
  m.def("channel_gate_backward(Tensor grad, Tensor x, Tensor gate) -> (Tensor, Tensor)");
  m.def("gated_affine(Tensor weight, Tensor bias, Tensor gate) -> (Tensor, Tensor)");
  m.def(
      "gated_affine_backward(Tensor grad_weight, Tensor grad_bias, Tensor weight, Tensor bias, Tensor gate) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(polarprune_C, CUDA, m) {
  m.impl("binary_gate", &polarprune::binary_gate_cuda);
  m.impl("binary_gate_backward", &polarprune::binary_gate_backward_cuda);
  m.impl("gate_penalty", &polarprune::gate_penalty_cuda);
  m.impl("gate_bank", &polarprune::gate_bank_cuda);
  m.impl("gate_bank_backward", &polarprune::gate_bank_backward_cuda);
  m.impl("channel_gate", &polarprune::channel_gate_cuda);
  m.impl("channel_gate_backward", &polarprune::channel_gate_backward_cuda);
  m.impl("gated_affine", &polarprune::gated_affine_cuda);
  m.impl("gated_affine_backward", &polarprune::gated_affine_backward_cuda);
}

namespace polarprune {
int64_t cuda_runtime_version_built() { return CUDART_VERSION; }

// The launch grid a kernel gets for a shape (launch_grids.h), for tests on machines without a GPU.
pybind11::dict launch_grid(const std::string& kernel, int64_t n, int64_t c, int64_t hw, bool channels_fast,
                           int64_t vec) {
  pybind11::dict out;
  out["max_grid"] = pybind11::make_tuple(kMaxGridX, kMaxGridYZ, kMaxGridYZ);
  if (kernel == "elementwise") {
    out["grid"] = pybind11::make_tuple(elementwise_blocks(n), 1, 1);
    out["threads"] = kThreads;
    return out;
  }
  if (kernel == "penalty") {
    out["grid"] = pybind11::make_tuple(1, 1, 1);
    out["threads"] = kReduceThreads;
    return out;
  }
  if (kernel != "channel_gate" && kernel != "channel_gate_backward")
    throw std::invalid_argument("kernel must be one of elementwise, penalty, channel_gate, channel_gate_backward, got " +
                                kernel);
  const auto g = channel_gate_grid(n, c, hw, channels_fast, vec, kernel == "channel_gate_backward");
  out["grid"] = pybind11::make_tuple(g.grid_x, g.grid_y, 1);
  out["threads"] = kThreads;
  out["rows"] = g.rows;
  out["inner"] = g.inner;
  out["row_div"] = g.row_div;
  out["vec"] = g.vec;
  out["threads_per_row"] = g.threads_per_row;
  out["rows_per_block"] = g.rows_per_block;
  out["row_blocks"] = g.row_blocks;
  out["tiles"] = g.tiles;
  out["partial_rows"] = g.partial_rows;
  out["gate_inner"] = g.gate_inner;
  return out;
}
}  // namespace polarprune

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels of polarprune_cuda, registered as torch.ops.polarprune_C.*";
  m.def("cuda_runtime_version_built", &polarprune::cuda_runtime_version_built,
        "CUDART_VERSION the extension was compiled against");
  m.def("launch_grid", &polarprune::launch_grid, pybind11::arg("kernel"), pybind11::arg("n"), pybind11::arg("c") = 1,
        pybind11::arg("hw") = 1, pybind11::arg("channels_fast") = false, pybind11::arg("vec") = 1,
        "the launch grid (csrc/launch_grids.h) a kernel gets for an (N, C, HW) shape");
}
