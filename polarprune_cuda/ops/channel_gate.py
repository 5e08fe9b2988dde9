"""``polarprune::channel_gate(x, gate) -> y = x * gate[c]`` and its backward op (dx, dgate)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .common import check_gate_for, define, input_grads, op_args


@define("channel_gate")
def _channel_gate(x: Tensor, gate: Tensor) -> Tensor:
    return backends.impl("channel_gate", x.device)(x, gate)


@_channel_gate.register_fake
def _(x, gate):
    return torch.empty_like(x)


@define("channel_gate_backward")
def _channel_gate_backward(grad: Tensor, x: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    return backends.impl("channel_gate_backward", x.device)(grad, x, gate)


@_channel_gate_backward.register_fake
def _(grad, x, gate):
    return torch.empty_like(grad), torch.empty_like(gate)


def _setup(ctx, inputs, output):
    args = op_args(_channel_gate)(*inputs)
    ctx.save_for_backward(args.x, args.gate)


def _backward(ctx, grad):
    x, gate = ctx.saved_tensors
    dx, dgate = _channel_gate_backward(grad, x, gate)
    return input_grads(_channel_gate, x=dx, gate=dgate)


_channel_gate.register_autograd(_backward, setup_context=_setup)


def channel_gate(x: Tensor, gate: Tensor) -> Tensor:
    """Activation gate ``y = x * gate[c]`` for x of shape (N, C, ...) in any memory format."""
    check_gate_for(x, gate)
    return _channel_gate(x, gate)
