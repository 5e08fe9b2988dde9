// Codes of the string arguments of the ops, as the kernels see them. The one table is Python's
// (polarprune_cuda/ops/common.py: STE_CODES, POLAR_CODES); tests/ops/test_op_schemas.py parses this
// file and fails when the two disagree, so edit both together.
#pragma once
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstddef>
#include <string>

namespace polarprune {

// ``ste``: straight-through estimator of binary_gate_backward and gate_bank_backward.
enum SteCode : int { kSteIdentity = 0, kSteClipped = 1, kSteSigmoid = 2 };
// ``polar_form``: polarization term of gate_penalty and gate_bank.
enum PolarCode : int { kPolarZhuang = 0, kPolarBimodal = 1 };

struct NamedCode {
  const char* name;
  int code;
};

constexpr NamedCode kSteNames[] = {{"identity", kSteIdentity}, {"clipped", kSteClipped}, {"sigmoid", kSteSigmoid}};
constexpr NamedCode kPolarNames[] = {{"zhuang", kPolarZhuang}, {"bimodal", kPolarBimodal}};

template <std::size_t N>
int code_of(const NamedCode (&table)[N], c10::string_view value, const char* what) {
  std::string names;
  for (const auto& entry : table) {
    if (value == entry.name) return entry.code;
    names += (names.empty() ? "" : ", ") + std::string(entry.name);
  }
  TORCH_CHECK(false, what, " must be one of ", names, ", got ", std::string(value));
}

inline int ste_code(c10::string_view ste) { return code_of(kSteNames, ste, "ste"); }
inline int polar_code(c10::string_view form) { return code_of(kPolarNames, form, "polar_form"); }

}  // namespace polarprune
