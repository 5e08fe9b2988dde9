// Host entry points of the CUDA kernels (csrc/<op>.cu, one file per op), registered in registration.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace polarprune {

at::Tensor binary_gate_cuda(const at::Tensor& scores, c10::string_view ste, double tau);
at::Tensor binary_gate_backward_cuda(const at::Tensor& grad, const at::Tensor& scores, c10::string_view ste,
                                     double tau);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_penalty_cuda(
    const at::Tensor& scores, const at::Tensor& cost, const at::Tensor& seg_offsets, const at::Tensor& pairs,
    const at::Tensor& pair_coef, int64_t num_segments, double cst, double total, double tau, double rho,
    double target_weight, double polar_weight, c10::string_view polar_form, double t);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_bank_cuda(
    const at::Tensor& scores, c10::string_view ste, const at::Tensor& cost, const at::Tensor& seg_offsets,
    const at::Tensor& pairs, const at::Tensor& pair_coef, int64_t num_segments, double cst, double total, double tau,
    double rho, c10::string_view polar_form, double t);
at::Tensor gate_bank_backward_cuda(const at::Tensor& grad_gates, const at::Tensor& grad_terms,
                                   const at::Tensor& scores, const at::Tensor& grad_target,
                                   const at::Tensor& grad_polar, c10::string_view ste, double tau);
at::Tensor channel_gate_cuda(const at::Tensor& x, const at::Tensor& gate);
std::tuple<at::Tensor, at::Tensor> channel_gate_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                              const at::Tensor& gate);
std::tuple<at::Tensor, at::Tensor> gated_affine_cuda(const at::Tensor& weight, const at::Tensor& bias,
                                                     const at::Tensor& gate);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_affine_backward_cuda(const at::Tensor& grad_weight,
                                                                          const at::Tensor& grad_bias,
                                                                          const at::Tensor& weight,
                                                                          const at::Tensor& bias,
                                                                          const at::Tensor& gate);
int64_t cuda_runtime_version_built();

}  // namespace polarprune
