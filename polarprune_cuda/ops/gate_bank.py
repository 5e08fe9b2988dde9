"""``polarprune::gate_bank``: every gate and both penalty terms of a bank in one pass (and one backward op).

``gate_bank(scores, ste, <COST_ARGS>, tau, rho, polar_form, t) -> (gates,
terms, grad_target, grad_polar)``; ``gate_bank_backward(grad_gates,
grad_terms, scores, grad_target, grad_polar, ste, tau) -> grad_scores``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .common import acc_dtype, check_penalty, check_scores, check_ste, define, input_grads, op_args


@define("gate_bank")
def _gate_bank(
    scores: Tensor,
    ste: str,
    cost: Tensor,
    seg_offsets: Tensor,
    pairs: Tensor,
    pair_coef: Tensor,
    num_segments: int,
    const: float,
    total: float,
    tau: float,
    rho: float,
    polar_form: str,
    t: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fn = backends.impl("gate_bank", scores.device)
    return fn(scores, ste, cost, seg_offsets, pairs, pair_coef, num_segments, const, total, tau, rho, polar_form, t)


@_gate_bank.register_fake
def _(scores, *_):
    acc = acc_dtype(scores.dtype)
    return (torch.empty_like(scores), scores.new_empty((4,), dtype=acc), torch.empty_like(scores),
            torch.empty_like(scores))


@define("gate_bank_backward")
def _gate_bank_backward(grad_gates: Tensor, grad_terms: Tensor, scores: Tensor, grad_target: Tensor,
                        grad_polar: Tensor, ste: str, tau: float) -> Tensor:
    fn = backends.impl("gate_bank_backward", scores.device)
    return fn(grad_gates, grad_terms, scores, grad_target, grad_polar, ste, tau)


@_gate_bank_backward.register_fake
def _(grad_gates, grad_terms, scores, *_):
    return torch.empty_like(scores)


def _setup(ctx, inputs, output):
    args = op_args(_gate_bank)(*inputs)
    _, _, grad_target, grad_polar = output
    ctx.ste, ctx.tau = args.ste, args.tau
    ctx.mark_non_differentiable(grad_target, grad_polar)
    ctx.save_for_backward(args.scores, grad_target, grad_polar)


def _backward(ctx, grad_gates, grad_terms, _grad_target, _grad_polar):
    scores, grad_target, grad_polar = ctx.saved_tensors
    if grad_gates is None:
        grad_gates = torch.zeros_like(scores)
    if grad_terms is None:
        grad_terms = grad_target.new_zeros((4,), dtype=acc_dtype(scores.dtype))
    ds = _gate_bank_backward(grad_gates, grad_terms, scores, grad_target, grad_polar, ctx.ste, ctx.tau)
    return input_grads(_gate_bank, scores=ds)


_gate_bank.register_autograd(_backward, setup_context=_setup)


def gate_bank(scores: Tensor, ste: str, tau: float, cost_model, rho: float, polar_form: str,
              t: float) -> tuple[Tensor, Tensor]:
    """Hard gates and penalty terms of a whole bank in one op call; returns ``(gates, terms)``.

    ``terms`` = (density, target term, polar term, non-finite count); the target
    and polar terms are differentiable (weight them and add them to the loss).
    """
    from .cost import CostModel

    check_scores(scores)
    check_ste(ste, tau)
    if not isinstance(cost_model, CostModel):
        raise TypeError(f"cost_model must be a CostModel, got {type(cost_model).__name__}")
    cost_args = cost_model.op_args(scores.device)
    check_penalty(scores, *cost_args, float(tau), float(rho), 1.0, 1.0, polar_form, float(t))
    gates, terms, _, _ = _gate_bank(scores, ste, *cost_args, float(tau), float(rho), polar_form, float(t))
    return gates, terms
