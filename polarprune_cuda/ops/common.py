"""What every op of the ``polarprune::`` namespace shares: its name, the op list, the code tables and the checks.

* :data:`OPS` is the one list of op names; ``backends.OPS``, ``functional.ALL_OPS``
  and the Triton ``IMPLEMENTATIONS`` are derived from it (and checked against it).
* :data:`STE_CODES` and :data:`POLAR_CODES` are the one table of the string
  arguments and the integer codes the kernels use; ``csrc/gate_codes.h`` holds
  the C++ copy and ``tests/ops/test_op_schemas.py`` checks that the two agree.
* :func:`define` registers a ``polarprune::<name>`` custom op and records it;
  :func:`op_args` gives the schema arguments of an op by name, so autograd
  rules read ``inputs`` by name instead of by position.
* The argument checks read metadata only (no device synchronisation).

Nothing here imports the rest of the op layer.
"""
from __future__ import annotations

import math
from collections import namedtuple
from typing import Callable

import torch
from torch import Tensor
from torch.library import custom_op

NAMESPACE = "polarprune"

#: Every op of the namespace, forward ops first with their backward op after them.
OPS = (
    "binary_gate",
    "binary_gate_backward",
    "gate_penalty",
    "channel_gate",
    "channel_gate_backward",
    "gated_affine",
    "gated_affine_backward",
    "gate_bank",
    "gate_bank_backward",
)

#: ``ste`` argument -> kernel code (csrc/gate_codes.h: enum class Ste).
STE_CODES = {"identity": 0, "clipped": 1, "sigmoid": 2}
#: ``polar_form`` argument -> kernel code (csrc/gate_codes.h: enum class PolarForm).
POLAR_CODES = {"zhuang": 0, "bimodal": 1}
STE_MODES = tuple(STE_CODES)
POLAR_FORMS = tuple(POLAR_CODES)

#: The cost-model arguments of gate_penalty and gate_bank, in schema order (CostModel.op_args).
COST_ARGS = ("cost", "seg_offsets", "pairs", "pair_coef", "num_segments", "const", "total")


# --------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------

#: name -> custom op, filled by :func:`define` as the per-op modules are imported.
DEFINED: dict[str, Callable] = {}


def define(name: str) -> Callable:
    """Decorator: register ``fn`` (schema from its annotations) as ``polarprune::<name>``."""
    if name not in OPS:
        raise ValueError(f"{name!r} is not in polarprune_cuda.ops.common.OPS; add it there first")

    def wrap(fn):
        op = custom_op(f"{NAMESPACE}::{name}", mutates_args=())(fn)
        DEFINED[name] = op
        return op

    return wrap


def schema_of(op) -> torch.FunctionSchema:
    """The registered schema of a custom op (``torch.ops.polarprune.<name>.default``)."""
    return op._opoverload._schema


_ARG_TUPLES: dict[str, type] = {}


def op_args(op):
    """A namedtuple type of ``op``'s schema arguments: ``op_args(op)(*inputs).tau``."""
    schema = schema_of(op)
    if schema.name not in _ARG_TUPLES:
        fields = [a.name for a in schema.arguments]
        _ARG_TUPLES[schema.name] = namedtuple(schema.name.split("::")[-1] + "_args", fields)
    return _ARG_TUPLES[schema.name]


def input_grads(op, **grads) -> tuple:
    """The tuple a backward returns for ``op``: the named gradients, None for every other input."""
    args = op_args(op)
    unknown = set(grads) - set(args._fields)
    if unknown:
        raise TypeError(f"{schema_of(op).name} has no inputs {sorted(unknown)}")
    return tuple(grads.get(name) for name in args._fields)


# --------------------------------------------------------------------------
# Validation (metadata only: no device synchronisation)
# --------------------------------------------------------------------------

def check_tensor(value, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(t: Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), "
                        f"got {t.dtype}")


def check_vector(t: Tensor, name: str) -> None:
    if t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor (one entry per gated channel), got shape {tuple(t.shape)}")


def check_same_device(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}; move both to one device")


def check_scores(scores, name: str = "scores") -> Tensor:
    check_tensor(scores, name)
    check_float(scores, name)
    check_vector(scores, name)
    return scores


def check_tau(tau) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")


def check_ste(ste, tau) -> None:
    if not isinstance(ste, str) or ste not in STE_CODES:
        raise ValueError(f"ste must be one of {', '.join(STE_MODES)}, got {ste!r}")
    check_tau(tau)


def check_polar_form(polar_form) -> None:
    if polar_form not in POLAR_CODES:
        raise ValueError(f"polarization must be one of {', '.join(POLAR_FORMS)}, got {polar_form!r}")


def is_number(value) -> bool:
    """A real, finite int or float, not a bool: what every numeric argument and option of the package must be
    (the one check; each caller adds its range and its message)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_target_sparsity(value, name: str = "target_sparsity") -> float:
    """The fraction of a cost to remove: a number in [0, 1) (the penalty, the loss and the exact budget)."""
    if not is_number(value) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_number(value, name: str, low: float | None = None, high: float | None = None) -> None:
    if not is_number(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def check_gate_for(x, gate, x_name: str = "x", gate_name: str = "gate") -> None:
    check_tensor(x, x_name)
    check_tensor(gate, gate_name)
    check_float(x, x_name)
    check_float(gate, gate_name)
    if x.dim() < 2:
        raise ValueError(f"{x_name} must have shape (N, C, ...) with channels in dim 1, got shape {tuple(x.shape)}")
    check_vector(gate, gate_name)
    if gate.numel() != x.shape[1]:
        raise ValueError(
            f"channel-count mismatch: {gate_name} has {gate.numel()} entries but {x_name} has "
            f"{x.shape[1]} channels (dim 1 of shape {tuple(x.shape)})"
        )
    check_same_device(x_name, x, gate_name, gate)


def check_penalty(scores, cost, seg_offsets, pairs, pair_coef, num_segments, const, total,
                  tau, rho, target_weight, polar_weight, polar_form, t) -> None:
    """The arguments of ``polarprune::gate_penalty`` (gate_bank checks its own through it, unit weights)."""
    check_scores(scores)
    check_tensor(cost, "cost")
    check_float(cost, "cost")
    if cost.shape != scores.shape:
        raise ValueError(f"cost must have the shape of scores {tuple(scores.shape)}, got {tuple(cost.shape)}")
    check_same_device("scores", scores, "cost", cost)
    for name, tensor in (("seg_offsets", seg_offsets), ("pairs", pairs), ("pair_coef", pair_coef)):
        check_tensor(tensor, name)
        check_same_device("scores", scores, name, tensor)
    if seg_offsets.dtype != torch.int64 or pairs.dtype != torch.int64:
        raise TypeError(f"seg_offsets and pairs must be int64 tensors, got {seg_offsets.dtype} and {pairs.dtype}")
    check_float(pair_coef, "pair_coef")
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pair_coef.shape != (pairs.shape[0],):
        raise ValueError(f"pairs must have shape (L, 2) and pair_coef (L,), got {tuple(pairs.shape)} "
                         f"and {tuple(pair_coef.shape)}")
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 0:
        raise ValueError(f"num_segments must be an int >= 0, got {num_segments!r}")
    if pairs.numel() and seg_offsets.shape != (num_segments + 1,):
        raise ValueError(f"seg_offsets must have shape (num_segments + 1,) = ({num_segments + 1},), "
                         f"got {tuple(seg_offsets.shape)}")
    check_number(const, "const", 0.0)
    check_number(total, "total")
    if not total > 0:
        raise ValueError(f"total (the cost with every gate open) must be > 0, got {total!r}")
    check_tau(tau)
    check_number(rho, "rho (1 - target_sparsity)", 0.0, 1.0)
    check_number(target_weight, "target_weight", 0.0)
    check_number(polar_weight, "polar_weight", 0.0)
    check_number(t, "t", 0.0)
    check_polar_form(polar_form)
    if scores.numel() == 0:
        raise ValueError("scores is empty: the model has no gates (attach or bind gates first)")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)
