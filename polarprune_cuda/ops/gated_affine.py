"""``polarprune::gated_affine(weight, bias, gate) -> (weight * gate, bias * gate)`` and its backward op."""
from __future__ import annotations

import torch
from torch import Tensor

from . import backends, reference
from .common import check_float, check_same_device, check_tensor, check_vector, define, input_grads, op_args


@define("gated_affine")
def _gated_affine(weight: Tensor, bias: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    return backends.impl("gated_affine", weight.device)(weight, bias, gate)


@_gated_affine.register_fake
def _(weight, bias, gate):
    return torch.empty_like(weight), torch.empty_like(bias)


@define("gated_affine_backward")
def _gated_affine_backward(
    grad_weight: Tensor, grad_bias: Tensor, weight: Tensor, bias: Tensor, gate: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    fn = backends.impl("gated_affine_backward", weight.device)
    return fn(grad_weight, grad_bias, weight, bias, gate)


@_gated_affine_backward.register_fake
def _(grad_weight, grad_bias, weight, bias, gate):
    return torch.empty_like(weight), torch.empty_like(bias), torch.empty_like(gate)


def _setup(ctx, inputs, output):
    args = op_args(_gated_affine)(*inputs)
    ctx.save_for_backward(args.weight, args.bias, args.gate)


def _backward(ctx, grad_weight, grad_bias):
    weight, bias, gate = ctx.saved_tensors
    if grad_weight is None:
        grad_weight = torch.zeros_like(weight)
    if grad_bias is None:
        grad_bias = torch.zeros_like(bias)
    d_weight, d_bias, d_gate = _gated_affine_backward(grad_weight, grad_bias, weight, bias, gate)
    return input_grads(_gated_affine, weight=d_weight, bias=d_bias, gate=d_gate)


_gated_affine.register_autograd(_backward, setup_context=_setup)


def check_affine(weight, bias, gate) -> None:
    for name, t in (("weight", weight), ("bias", bias), ("gate", gate)):
        check_tensor(t, name)
        check_float(t, name)
        check_vector(t, name)
    if not (weight.numel() == bias.numel() == gate.numel()):
        raise ValueError(
            f"channel-count mismatch: weight has {weight.numel()}, bias {bias.numel()} and gate {gate.numel()} entries"
        )
    check_same_device("weight", weight, "bias", bias)
    check_same_device("weight", weight, "gate", gate)


# dtypes whose autograd through the reference equals its backward op bit for bit (accumulation dtype = dtype)
_PLAIN_DTYPES = (torch.float32, torch.float64)


def gated_affine(weight: Tensor, bias: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """``(weight * gate, bias * gate)``: a gated per-channel affine.

    Called once per gated BatchNorm per pass, on C numbers: where the kernel
    would be the pure-PyTorch reference anyway (eager mode, fp32/fp64, no
    other backend selected or forced) the reference runs under plain autograd,
    which gives the same values and gradients without the custom-op call
    overhead (about 0.1 ms per layer and pass on a CPU). Everywhere else, and
    under torch.compile, the ``polarprune::gated_affine`` op runs.
    """
    check_affine(weight, bias, gate)
    if (weight.dtype in _PLAIN_DTYPES and bias.dtype == weight.dtype and gate.dtype == weight.dtype
            and not torch.compiler.is_compiling()
            and backends.select("gated_affine", weight.device.type)[0] == "torch"):
        return reference.gated_affine(weight, bias, gate)
    return _gated_affine(weight, bias, gate)
