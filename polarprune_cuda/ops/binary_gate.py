"""``polarprune::binary_gate(scores, ste, tau) -> gate`` and its backward op.

Hard gates ``1[scores > 0]``; the backward is the straight-through gradient
``ds = dg * ste'(s)`` (reference.binary_gate_backward).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .common import check_scores, check_ste, define, input_grads, op_args


@define("binary_gate")
def _binary_gate(scores: Tensor, ste: str, tau: float) -> Tensor:
    return backends.impl("binary_gate", scores.device)(scores, ste, tau)


@_binary_gate.register_fake
def _(scores, *_):
    return torch.empty_like(scores)


@define("binary_gate_backward")
def _binary_gate_backward(grad: Tensor, scores: Tensor, ste: str, tau: float) -> Tensor:
    return backends.impl("binary_gate_backward", scores.device)(grad, scores, ste, tau)


@_binary_gate_backward.register_fake
def _(grad, scores, *_):
    return torch.empty_like(scores)


def _setup(ctx, inputs, output):
    args = op_args(_binary_gate)(*inputs)
    ctx.ste, ctx.tau = args.ste, args.tau
    ctx.save_for_backward(args.scores)


def _backward(ctx, grad):
    (scores,) = ctx.saved_tensors
    return input_grads(_binary_gate, scores=_binary_gate_backward(grad, scores, ctx.ste, ctx.tau))


_binary_gate.register_autograd(_backward, setup_context=_setup)


def binary_gate(scores: Tensor, ste: str = "identity", tau: float = 1.0) -> Tensor:
    """Hard gates ``1[scores > 0]`` of a 1-D score vector, straight-through backward.

    ``ste``: ``identity`` (ds = dg), ``clipped`` (ds = dg * 1[|s| <= 1]) or
    ``sigmoid`` (ds = dg * d sigmoid(s / tau) / ds); the specification is
    :func:`polarprune_cuda.ops.reference.binary_gate`.
    """
    check_scores(scores)
    check_ste(ste, tau)
    return _binary_gate(scores, ste, float(tau))
