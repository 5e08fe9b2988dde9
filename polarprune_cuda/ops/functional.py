"""Functional API over the ops, for people composing their own layers.

Every function validates its arguments (ValueError/TypeError naming the
argument) and runs on the backend :func:`polarprune_cuda.backend_info` reports.
``binary_gate``, ``channel_gate`` and ``gated_affine`` are the op layer's own
checked wrappers (``ops/<op>.py``), re-exported; the others add defaults or
compose ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import core as ops
from .binary_gate import binary_gate  # the checked op wrappers themselves: one function under each name
from .channel_gate import channel_gate
from .cost import CostModel
from .gated_affine import gated_affine
from .reference import PENALTY_TERMS

__all__ = [
    "binary_gate",
    "gate_probability",
    "gate_penalty",
    "channel_gate",
    "gated_affine",
    "gated_batch_norm",
    "PENALTY_TERMS",
]


def gate_probability(scores: Tensor, tau: float = 1.0) -> Tensor:
    """``sigmoid(scores / tau)``, the soft gate the penalty acts on."""
    ops.check_scores(scores)
    ops.check_tau(tau)
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
    ops.check_target_sparsity(target_sparsity)
    ops.check_scores(scores)
    if cost is None:
        cost = CostModel.channels(scores.numel(), scores.device)
    return ops.gate_penalty(scores, cost, tau, 1.0 - target_sparsity, target_weight,
                            polarization_weight, polarization, t)


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
    ops.check_gate_for(x, gate)
    w, b = ops.gated_affine(weight, bias, gate)
    return F.batch_norm(x, running_mean, running_var, w, b, training, momentum, eps)
