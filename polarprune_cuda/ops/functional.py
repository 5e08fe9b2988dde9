"""The op layer's public face: every op's checked function, the functions composed from them, and the ops themselves.

One op lives in one file (schema, fake impl, autograd rule, checked wrapper):
:mod:`.binary_gate`, :mod:`.gate_penalty`, :mod:`.gate_bank`,
:mod:`.channel_gate`, :mod:`.gated_affine`; what they share (namespace, op
list, STE and polarization codes, argument checks) is :mod:`.common`. Each op's
implementation asks :mod:`.backends` for the kernel of the tensors' device
(CUDA extension, Triton, or the pure-PyTorch reference); backward passes are
ops of their own, so every backend can fuse them. Schemas are owned in Python
(from the annotations of each op function); the compiled extension defines the
same schemas under ``polarprune_C::`` and tests/ops/test_op_schemas.py checks
that they agree.

Every function here validates its arguments (ValueError/TypeError naming the
argument) and runs on the backend :func:`polarprune_cuda.backend_info`
reports. ``binary_gate``, ``channel_gate``, ``gated_affine`` and ``gate_bank``
are the op files' checked wrappers themselves (one function under each name);
``gate_probability``, ``gate_penalty`` (the penalty with a target sparsity and
defaults, over the op's checked wrapper
:func:`polarprune_cuda.ops.gate_penalty.gate_penalty`) and ``gated_batch_norm``
add defaults or compose ops. :data:`ALL_OPS` holds the raw custom ops
(``torch.ops.polarprune.*``) by name, for opcheck and registration tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .binary_gate import binary_gate
from .channel_gate import channel_gate
from .common import DEFINED, OPS, check_gate_for, check_scores, check_target_sparsity, check_tau
from .cost import CostModel
from .gate_bank import gate_bank
from .gate_penalty import gate_penalty as penalty_op   # the op's checked wrapper (rho and every weight given)
from .gated_affine import gated_affine
from .reference import PENALTY_TERMS

_missing = [name for name in OPS if name not in DEFINED]
if _missing:
    raise ImportError(f"ops listed in common.OPS but defined by no op module: {_missing}")

#: Every op of the namespace (in common.OPS order), for opcheck and registration tests.
ALL_OPS = {name: DEFINED[name] for name in OPS}

__all__ = [
    "ALL_OPS",
    "PENALTY_TERMS",
    "binary_gate",
    "channel_gate",
    "gate_bank",
    "gate_penalty",
    "gate_probability",
    "gated_affine",
    "gated_batch_norm",
]


def gate_probability(scores: Tensor, tau: float = 1.0) -> Tensor:
    """``sigmoid(scores / tau)``, the soft gate the penalty acts on."""
    check_scores(scores)
    check_tau(tau)
    return torch.sigmoid(scores / tau)


def gate_penalty(
    scores: Tensor,
    cost: "Tensor | CostModel | None" = None,
    *,
    target_sparsity: float,
    target_weight: float = 20.0,
    polarization_weight: float = 0.1,
    polarization: str = "bimodal",
    t: float = 1.0,
    tau: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Density-target plus polarization penalty over a flat score vector.

    Returns ``(loss, terms)``; ``terms`` holds :data:`PENALTY_TERMS`
    (density, target term, polar term, number of non-finite scores) and is not
    differentiable. ``cost`` is a tensor of per-gate weights (its sum is read
    once per call), a :class:`~polarprune_cuda.ops.cost.CostModel`, or None for one
    per gate.
    """
    check_target_sparsity(target_sparsity)
    check_scores(scores)
    if cost is None:
        cost = CostModel.channels(scores.numel(), scores.device)
    return penalty_op(scores, cost, tau, 1.0 - target_sparsity, target_weight, polarization_weight, polarization, t)


def gated_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    gate: Tensor,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch norm whose affine is gated: ``F.batch_norm`` with ``weight*gate``, ``bias*gate``."""
    check_gate_for(x, gate)
    w, b = gated_affine(weight, bias, gate)
    return F.batch_norm(x, running_mean, running_var, w, b, training, momentum, eps)
