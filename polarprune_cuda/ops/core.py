"""The op layer: ``polarprune::*`` custom ops with fake and autograd registrations.

Each op is a :func:`torch.library.custom_op` whose implementation asks
:mod:`polarprune_cuda.ops.backends` for the kernel of the tensors' device (CUDA
extension, Triton, or the pure-PyTorch reference). Backward passes are ops of
their own, so every backend can fuse them. The Python functions at the bottom
(:func:`binary_gate`, :func:`gate_penalty`, ...) validate their arguments and
are what the rest of the package calls; :mod:`polarprune_cuda.ops.functional`
exposes them with keyword defaults.

Ops (schemas are owned here, in Python; a compiled extension only adds kernels):

* ``binary_gate(scores, ste, tau) -> gate`` and its backward;
* ``gate_penalty(scores, cost, seg_offsets, pairs, pair_coef, num_segments, const,
  total, tau, rho, target_weight, polar_weight, polar_form, t) -> (loss, grad,
  terms)``: value and gradient in one pass, over an exact cost model;
* ``channel_gate(x, gate) -> y`` and ``channel_gate_backward(dy, x, gate) -> (dx, dgate)``;
* ``gated_affine(weight, bias, gate) -> (weight * gate, bias * gate)`` and its backward.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.library import custom_op

from . import backends, reference
from .reference import POLAR_FORMS, STE_MODES

NAMESPACE = "polarprune"


# --------------------------------------------------------------------------
# Validation (metadata only: no device synchronisation)
# --------------------------------------------------------------------------

def _check_tensor(value, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_float(t: Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), got {t.dtype}")


def _check_vector(t: Tensor, name: str) -> None:
    if t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor (one entry per gated channel), got shape {tuple(t.shape)}")


def _check_same_device(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}; move both to one device")


def check_scores(scores, name: str = "scores") -> Tensor:
    _check_tensor(scores, name)
    _check_float(scores, name)
    _check_vector(scores, name)
    return scores


def check_ste(ste, tau) -> None:
    if not isinstance(ste, str) or ste not in STE_MODES:
        raise ValueError(f"ste must be one of {', '.join(STE_MODES)}, got {ste!r}")
    check_tau(tau)


def check_tau(tau) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")


def _check_number(value, name: str, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def check_gate_for(x, gate, x_name: str = "x", gate_name: str = "gate") -> None:
    _check_tensor(x, x_name)
    _check_tensor(gate, gate_name)
    _check_float(x, x_name)
    _check_float(gate, gate_name)
    if x.dim() < 2:
        raise ValueError(f"{x_name} must have shape (N, C, ...) with channels in dim 1, got shape {tuple(x.shape)}")
    _check_vector(gate, gate_name)
    if gate.numel() != x.shape[1]:
        raise ValueError(
            f"channel-count mismatch: {gate_name} has {gate.numel()} entries but {x_name} has "
            f"{x.shape[1]} channels (dim 1 of shape {tuple(x.shape)})"
        )
    _check_same_device(x_name, x, gate_name, gate)


def _check_affine(weight, bias, gate) -> None:
    for name, t in (("weight", weight), ("bias", bias), ("gate", gate)):
        _check_tensor(t, name)
        _check_float(t, name)
        _check_vector(t, name)
    if not (weight.numel() == bias.numel() == gate.numel()):
        raise ValueError(
            f"channel-count mismatch: weight has {weight.numel()}, bias {bias.numel()} and gate {gate.numel()} entries"
        )
    _check_same_device("weight", weight, "bias", bias)
    _check_same_device("weight", weight, "gate", gate)


def _check_penalty(scores, cost, seg_offsets, pairs, pair_coef, num_segments, const, total,
                   tau, rho, target_weight, polar_weight, polar_form, t) -> None:
    check_scores(scores)
    _check_tensor(cost, "cost")
    _check_float(cost, "cost")
    if cost.shape != scores.shape:
        raise ValueError(f"cost must have the shape of scores {tuple(scores.shape)}, got {tuple(cost.shape)}")
    _check_same_device("scores", scores, "cost", cost)
    for name, tensor in (("seg_offsets", seg_offsets), ("pairs", pairs), ("pair_coef", pair_coef)):
        _check_tensor(tensor, name)
        _check_same_device("scores", scores, name, tensor)
    if seg_offsets.dtype != torch.int64 or pairs.dtype != torch.int64:
        raise TypeError(f"seg_offsets and pairs must be int64 tensors, got {seg_offsets.dtype} and {pairs.dtype}")
    _check_float(pair_coef, "pair_coef")
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pair_coef.shape != (pairs.shape[0],):
        raise ValueError(f"pairs must have shape (L, 2) and pair_coef (L,), got {tuple(pairs.shape)} "
                         f"and {tuple(pair_coef.shape)}")
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 0:
        raise ValueError(f"num_segments must be an int >= 0, got {num_segments!r}")
    if pairs.numel() and seg_offsets.shape != (num_segments + 1,):
        raise ValueError(f"seg_offsets must have shape (num_segments + 1,) = ({num_segments + 1},), "
                         f"got {tuple(seg_offsets.shape)}")
    _check_number(const, "const", 0.0)
    _check_number(total, "total")
    if not total > 0:
        raise ValueError(f"total (the cost with every gate open) must be > 0, got {total!r}")
    check_tau(tau)
    _check_number(rho, "rho (1 - target_sparsity)", 0.0, 1.0)
    _check_number(target_weight, "target_weight", 0.0)
    _check_number(polar_weight, "polar_weight", 0.0)
    _check_number(t, "t", 0.0)
    if polar_form not in POLAR_FORMS:
        raise ValueError(f"polarization must be one of {', '.join(POLAR_FORMS)}, got {polar_form!r}")
    if scores.numel() == 0:
        raise ValueError("scores is empty: the model has no gates (attach or bind gates first)")


# --------------------------------------------------------------------------
# binary_gate
# --------------------------------------------------------------------------

@custom_op(f"{NAMESPACE}::binary_gate", mutates_args=())
def _binary_gate(scores: Tensor, ste: str, tau: float) -> Tensor:
    return backends.impl("binary_gate", scores.device)(scores, ste, tau)


@_binary_gate.register_fake
def _(scores, ste, tau):
    return torch.empty_like(scores)


@custom_op(f"{NAMESPACE}::binary_gate_backward", mutates_args=())
def _binary_gate_backward(grad: Tensor, scores: Tensor, ste: str, tau: float) -> Tensor:
    return backends.impl("binary_gate_backward", scores.device)(grad, scores, ste, tau)


@_binary_gate_backward.register_fake
def _(grad, scores, ste, tau):
    return torch.empty_like(scores)


def _binary_gate_setup(ctx, inputs, output):
    scores, ste, tau = inputs
    ctx.ste, ctx.tau = ste, tau
    ctx.save_for_backward(scores)


def _binary_gate_bwd(ctx, grad):
    (scores,) = ctx.saved_tensors
    return _binary_gate_backward(grad, scores, ctx.ste, ctx.tau), None, None


_binary_gate.register_autograd(_binary_gate_bwd, setup_context=_binary_gate_setup)


# --------------------------------------------------------------------------
# gate_penalty: value and gradient in one pass
# --------------------------------------------------------------------------

@custom_op(f"{NAMESPACE}::gate_penalty", mutates_args=())
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
def _(scores, cost, seg_offsets, pairs, pair_coef, num_segments, const, total,
      tau, rho, target_weight, polar_weight, polar_form, t):
    acc = torch.promote_types(scores.dtype, torch.float32)
    loss = scores.new_empty((), dtype=acc)
    terms = scores.new_empty((4,), dtype=acc)
    return loss, torch.empty_like(scores), terms


def _gate_penalty_setup(ctx, inputs, output):
    _, grad, terms = output
    ctx.mark_non_differentiable(grad, terms)
    ctx.save_for_backward(grad)


def _gate_penalty_bwd(ctx, grad_loss, _grad_grad, _grad_terms):
    (grad,) = ctx.saved_tensors
    return (grad_loss.to(grad.dtype) * grad,) + (None,) * 13


_gate_penalty.register_autograd(_gate_penalty_bwd, setup_context=_gate_penalty_setup)


# --------------------------------------------------------------------------
# gate_bank: every gate and both penalty terms in one pass (and one backward)
# --------------------------------------------------------------------------

@custom_op(f"{NAMESPACE}::gate_bank", mutates_args=())
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
def _(scores, ste, cost, seg_offsets, pairs, pair_coef, num_segments, const, total, tau, rho, polar_form, t):
    acc = torch.promote_types(scores.dtype, torch.float32)
    return (torch.empty_like(scores), scores.new_empty((4,), dtype=acc), torch.empty_like(scores),
            torch.empty_like(scores))


@custom_op(f"{NAMESPACE}::gate_bank_backward", mutates_args=())
def _gate_bank_backward(grad_gates: Tensor, grad_terms: Tensor, scores: Tensor, grad_target: Tensor,
                        grad_polar: Tensor, ste: str, tau: float) -> Tensor:
    fn = backends.impl("gate_bank_backward", scores.device)
    return fn(grad_gates, grad_terms, scores, grad_target, grad_polar, ste, tau)


@_gate_bank_backward.register_fake
def _(grad_gates, grad_terms, scores, grad_target, grad_polar, ste, tau):
    return torch.empty_like(scores)


def _gate_bank_setup(ctx, inputs, output):
    scores, ste, tau = inputs[0], inputs[1], inputs[9]
    _, _, grad_target, grad_polar = output
    ctx.ste, ctx.tau = ste, tau
    ctx.mark_non_differentiable(grad_target, grad_polar)
    ctx.save_for_backward(scores, grad_target, grad_polar)


def _gate_bank_bwd(ctx, grad_gates, grad_terms, _gt, _gp):
    scores, grad_target, grad_polar = ctx.saved_tensors
    if grad_gates is None:
        grad_gates = torch.zeros_like(scores)
    if grad_terms is None:
        grad_terms = grad_target.new_zeros((4,), dtype=torch.promote_types(scores.dtype, torch.float32))
    ds = _gate_bank_backward(grad_gates, grad_terms, scores, grad_target, grad_polar, ctx.ste, ctx.tau)
    return (ds,) + (None,) * 12


_gate_bank.register_autograd(_gate_bank_bwd, setup_context=_gate_bank_setup)


# --------------------------------------------------------------------------
# channel_gate: y = x * g[c]
# --------------------------------------------------------------------------

@custom_op(f"{NAMESPACE}::channel_gate", mutates_args=())
def _channel_gate(x: Tensor, gate: Tensor) -> Tensor:
    return backends.impl("channel_gate", x.device)(x, gate)


@_channel_gate.register_fake
def _(x, gate):
    return torch.empty_like(x)


@custom_op(f"{NAMESPACE}::channel_gate_backward", mutates_args=())
def _channel_gate_backward(grad: Tensor, x: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    return backends.impl("channel_gate_backward", x.device)(grad, x, gate)


@_channel_gate_backward.register_fake
def _(grad, x, gate):
    return torch.empty_like(grad), torch.empty_like(gate)


def _channel_gate_setup(ctx, inputs, output):
    x, gate = inputs
    ctx.save_for_backward(x, gate)


def _channel_gate_bwd(ctx, grad):
    x, gate = ctx.saved_tensors
    dx, dgate = _channel_gate_backward(grad, x, gate)
    return dx, dgate


_channel_gate.register_autograd(_channel_gate_bwd, setup_context=_channel_gate_setup)


# --------------------------------------------------------------------------
# gated_affine: (gamma * g, beta * g)
# --------------------------------------------------------------------------

@custom_op(f"{NAMESPACE}::gated_affine", mutates_args=())
def _gated_affine(weight: Tensor, bias: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    return backends.impl("gated_affine", weight.device)(weight, bias, gate)


@_gated_affine.register_fake
def _(weight, bias, gate):
    return torch.empty_like(weight), torch.empty_like(bias)


@custom_op(f"{NAMESPACE}::gated_affine_backward", mutates_args=())
def _gated_affine_backward(
    grad_weight: Tensor, grad_bias: Tensor, weight: Tensor, bias: Tensor, gate: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    fn = backends.impl("gated_affine_backward", weight.device)
    return fn(grad_weight, grad_bias, weight, bias, gate)


@_gated_affine_backward.register_fake
def _(grad_weight, grad_bias, weight, bias, gate):
    return torch.empty_like(weight), torch.empty_like(bias), torch.empty_like(gate)


def _gated_affine_setup(ctx, inputs, output):
    weight, bias, gate = inputs
    ctx.save_for_backward(weight, bias, gate)


def _gated_affine_bwd(ctx, grad_weight, grad_bias):
    weight, bias, gate = ctx.saved_tensors
    if grad_weight is None:
        grad_weight = torch.zeros_like(weight)
    if grad_bias is None:
        grad_bias = torch.zeros_like(bias)
    return _gated_affine_backward(grad_weight, grad_bias, weight, bias, gate)


_gated_affine.register_autograd(_gated_affine_bwd, setup_context=_gated_affine_setup)

#: Every op of the namespace, for opcheck and registration tests.
ALL_OPS = {
    "binary_gate": _binary_gate,
    "binary_gate_backward": _binary_gate_backward,
    "gate_penalty": _gate_penalty,
    "channel_gate": _channel_gate,
    "channel_gate_backward": _channel_gate_backward,
    "gated_affine": _gated_affine,
    "gated_affine_backward": _gated_affine_backward,
    "gate_bank": _gate_bank,
    "gate_bank_backward": _gate_bank_backward,
}


# --------------------------------------------------------------------------
# Validated entry points
# --------------------------------------------------------------------------

def binary_gate(scores: Tensor, ste: str = "identity", tau: float = 1.0) -> Tensor:
    """Hard gates ``1[scores > 0]`` with a straight-through backward (see reference.py)."""
    check_scores(scores)
    check_ste(ste, tau)
    return _binary_gate(scores, ste, float(tau))


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
        _check_float(cost_model, "cost")
        if cost_model.shape != scores.shape:
            raise ValueError(f"cost must have the shape of scores {tuple(scores.shape)}, got {tuple(cost_model.shape)}")
        _check_same_device("scores", scores, "cost", cost_model)
        cost_model = CostModel.linear_only(cost_model)
    if not isinstance(cost_model, CostModel):
        raise TypeError(f"cost_model must be a CostModel or a tensor, got {type(cost_model).__name__}")
    args = cost_model.op_args(scores.device) + (float(tau), float(rho), float(target_weight),
                                                 float(polar_weight), polar_form, float(t))
    _check_penalty(scores, *args)
    loss, _, terms = _gate_penalty(scores, *args)
    return loss, terms


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
    args = cost_model.op_args(scores.device)
    _check_penalty(scores, *args, float(tau), float(rho), 1.0, 1.0, polar_form, float(t))
    gates, terms, _, _ = _gate_bank(scores, ste, *args, float(tau), float(rho), polar_form, float(t))
    return gates, terms


def channel_gate(x: Tensor, gate: Tensor) -> Tensor:
    """Activation gate ``y = x * gate[c]`` for x of shape (N, C, ...) in any memory format."""
    check_gate_for(x, gate)
    return _channel_gate(x, gate)


def gated_affine(weight: Tensor, bias: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """``(weight * gate, bias * gate)``: a gated per-channel affine.

    Called once per gated BatchNorm per pass, on C numbers: where the kernel
    would be the pure-PyTorch reference anyway (eager mode, fp32/fp64, no
    other backend selected or forced) the reference runs under plain autograd,
    which gives the same values and gradients without the custom-op call
    overhead (about 0.1 ms per layer and pass on a CPU). Everywhere else, and
    under torch.compile, the ``polarprune::gated_affine`` op runs.
    """
    _check_affine(weight, bias, gate)
    if (weight.dtype in _PLAIN_DTYPES and bias.dtype == weight.dtype and gate.dtype == weight.dtype
            and not torch.compiler.is_compiling()
            and backends.select("gated_affine", weight.device.type)[0] == "torch"):
        return reference.gated_affine(weight, bias, gate)
    return _gated_affine(weight, bias, gate)


# dtypes whose autograd through the reference equals its backward op bit for bit (accumulation dtype = dtype)
_PLAIN_DTYPES = (torch.float32, torch.float64)
