"""``polarprune::gate_penalty``: penalty value and gradient in one pass, over an exact cost model.

``gate_penalty(scores, <COST_ARGS>, tau, rho, target_weight, polar_weight,
polar_form, t) -> (loss, grad, terms)``; the cost arguments are
:data:`~polarprune_cuda.ops.common.COST_ARGS` (``CostModel.op_args``). The
backward is ``grad_loss * grad`` (no op of its own).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .common import acc_dtype, check_float, check_penalty, check_same_device, check_scores, define, input_grads


@define("gate_penalty")
def _gate_penalty(
    scores: Tensor,
    cost: Tensor,
    seg_offsets: Tensor,
    pairs: Tensor,
    pair_coef: Tensor,
    num_segments: int,
    const: float,
    total: float,
    tau: float,
    rho: float,
    target_weight: float,
    polar_weight: float,
    polar_form: str,
    t: float,
) -> tuple[Tensor, Tensor, Tensor]:
    fn = backends.impl("gate_penalty", scores.device)
    return fn(scores, cost, seg_offsets, pairs, pair_coef, num_segments, const, total,
              tau, rho, target_weight, polar_weight, polar_form, t)


@_gate_penalty.register_fake
def _(scores, *_):
    acc = acc_dtype(scores.dtype)
    return scores.new_empty((), dtype=acc), torch.empty_like(scores), scores.new_empty((4,), dtype=acc)


def _setup(ctx, inputs, output):
    _, grad, terms = output
    ctx.mark_non_differentiable(grad, terms)
    ctx.save_for_backward(grad)


def _backward(ctx, grad_loss, _grad_grad, _grad_terms):
    (grad,) = ctx.saved_tensors
    return input_grads(_gate_penalty, scores=grad_loss.to(grad.dtype) * grad)


_gate_penalty.register_autograd(_backward, setup_context=_setup)


def gate_penalty(
    scores: Tensor,
    cost_model,
    tau: float,
    rho: float,
    target_weight: float,
    polar_weight: float,
    polar_form: str,
    t: float,
) -> tuple[Tensor, Tensor]:
    """Penalty over a flat score vector; returns ``(loss, terms)`` (terms: reference.PENALTY_TERMS).

    ``cost_model`` is a :class:`~polarprune_cuda.ops.cost.CostModel` (or a tensor of
    per-gate weights, read once here for its sum).
    """
    from .cost import CostModel

    check_scores(scores)
    if isinstance(cost_model, Tensor):
        check_float(cost_model, "cost")
        if cost_model.shape != scores.shape:
            raise ValueError(f"cost must have the shape of scores {tuple(scores.shape)}, got {tuple(cost_model.shape)}")
        check_same_device("scores", scores, "cost", cost_model)
        cost_model = CostModel.linear_only(cost_model)
    if not isinstance(cost_model, CostModel):
        raise TypeError(f"cost_model must be a CostModel or a tensor, got {type(cost_model).__name__}")
    args = cost_model.op_args(scores.device) + (float(tau), float(rho), float(target_weight),
                                                 float(polar_weight), polar_form, float(t))
    check_penalty(scores, *args)
    loss, _, terms = _gate_penalty(scores, *args)
    return loss, terms
