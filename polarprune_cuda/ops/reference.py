"""Pure-PyTorch implementations of every op: the specification and the fallback.

Every other backend (Triton kernels, the CUDA extension) is tested against the
functions in this module. They take already-validated arguments; the checks
live in :mod:`polarprune_cuda.ops.common` and the per-op modules.

Gate semantics (see docs/DESIGN.md, "Semantics of the gate"):

* hard gate ``g = 1[s > 0]`` (exactly binary, in the dtype of ``s``);
* probability ``p = sigmoid(s / tau)``;
* straight-through backward ``ds = dg * ste'(s)`` with ``ste`` one of
  ``identity`` (1), ``clipped`` (``1[|s| <= 1]``) or ``sigmoid``
  (``d sigmoid(s / tau) / ds``);
* penalty ``target_weight * (d - rho)^2 + polar_weight * R(p)`` with the
  cost-weighted density ``d = sum_j w_j p_j / sum_j w_j`` (or, for params and
  MACs, an exact cost with bilinear terms, see :func:`gate_penalty`) and ``R`` either the
  Zhuang et al. polarizer ``(t * sum_j p_j - sum_j |p_j - mean(p)|) / n`` or
  the bimodal term ``mean_j 4 p_j (1 - p_j)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common import POLAR_FORMS, STE_MODES  # noqa: F401  (the one table: common.STE_CODES / POLAR_CODES)

# Entries of the ``terms`` output of gate_penalty, in order.
PENALTY_TERMS = ("density", "target_term", "polar_term", "nonfinite")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def binary_gate(scores: Tensor, ste: str, tau: float) -> Tensor:
    """Hard gates ``1[s > 0]`` in the dtype of ``scores`` (ste/tau only matter for backward)."""
    return (scores > 0).to(scores.dtype)


def binary_gate_backward(grad: Tensor, scores: Tensor, ste: str, tau: float) -> Tensor:
    """Straight-through gradient ``ds = dg * ste'(s)``."""
    if ste == "identity":
        return grad.to(scores.dtype, copy=True)
    if ste == "clipped":
        return (grad * (scores.abs() <= 1).to(grad.dtype)).to(scores.dtype)
    if ste == "sigmoid":
        acc = _acc_dtype(scores.dtype)
        p = torch.sigmoid(scores.to(acc) / tau)
        return (grad.to(acc) * p * (1 - p) / tau).to(scores.dtype)
    raise ValueError(f"ste must be one of {STE_MODES}, got {ste!r}")


def _penalty_parts(scores, cost, seg_offsets, pairs, pair_coef, num_segments, const, total, tau, rho, polar_form, t):
    """(density, target term, polar term, d target/ds, d polar/ds, non-finite count), in the accumulation dtype."""
    acc = _acc_dtype(scores.dtype)
    s = scores.to(acc)
    w = cost.to(acc)
    n = s.numel()
    p = torch.sigmoid(s / tau)
    dp = p * (1 - p) / tau
    value = const + (w * p).sum()
    d_cost = w
    if pairs.numel():
        coef = pair_coef.to(acc)
        seg_ids = torch.searchsorted(seg_offsets[1:], torch.arange(n, device=s.device), right=True)
        seg_sum = torch.zeros(num_segments, dtype=acc, device=s.device).index_add_(0, seg_ids, p)
        left, right = seg_sum[pairs[:, 0]], seg_sum[pairs[:, 1]]
        value = value + (coef * left * right).sum()
        marginal = torch.zeros(num_segments, dtype=acc, device=s.device)
        marginal.index_add_(0, pairs[:, 0], coef * right).index_add_(0, pairs[:, 1], coef * left)
        d_cost = w + marginal[seg_ids]
    density = value / total
    diff = density - rho
    target_term = diff * diff
    g_target = (2 / total) * diff * d_cost * dp
    if polar_form == "zhuang":
        centred = p - p.mean()
        sgn = torch.sign(centred)
        polar_term = (t * p.sum() - centred.abs().sum()) / n
        g_polar = (t - sgn + sgn.mean()) / n * dp
    elif polar_form == "bimodal":
        polar_term = (4 * p * (1 - p)).sum() / n
        g_polar = 4 * (1 - 2 * p) / n * dp
    else:
        raise ValueError(f"polar_form must be one of {POLAR_FORMS}, got {polar_form!r}")
    nonfinite = (~torch.isfinite(s)).sum().to(acc)
    return density, target_term, polar_term, g_target, g_polar, nonfinite


def gate_penalty(
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
    """Penalty value and its gradient with respect to the scores, in one pass.

    The cost of a gate pattern ``p`` is ``const + sum_j cost_j p_j +
    sum_l pair_coef_l S[pairs_l0] S[pairs_l1]`` with segment sums
    ``S[k] = sum of p_j for seg_offsets[k] <= j < seg_offsets[k + 1]`` (a
    conv's MACs are the product of its kept inputs and kept outputs); the
    density is that cost over ``total`` (the cost with every gate open).
    Without pairs, ``seg_offsets`` may be empty.

    Returns ``(loss, grad, terms)``: ``loss`` is a 0-dim tensor, ``grad`` has the
    shape and dtype of ``scores``, ``terms`` holds (density, target term, polar
    term, number of non-finite scores) in the accumulation dtype.
    """
    density, target_term, polar_term, g_target, g_polar, nonfinite = _penalty_parts(
        scores, cost, seg_offsets, pairs, pair_coef, num_segments, const, total, tau, rho, polar_form, t)
    loss = target_weight * target_term + polar_weight * polar_term
    grad = (target_weight * g_target + polar_weight * g_polar).to(scores.dtype)
    return loss, grad, torch.stack([density, target_term, polar_term, nonfinite])


def gate_bank(
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
    """Every hard gate and both penalty terms of a gate bank, in one pass.

    Returns ``(gates, terms, grad_target, grad_polar)``: the hard gates, terms
    (density, target term, polar term, non-finite count), and the gradients of
    the target and polar terms with respect to the scores (unit weights), which
    the backward combines with the straight-through gradient of the gates.
    """
    density, target_term, polar_term, g_target, g_polar, nonfinite = _penalty_parts(
        scores, cost, seg_offsets, pairs, pair_coef, num_segments, const, total, tau, rho, polar_form, t)
    terms = torch.stack([density, target_term, polar_term, nonfinite])
    return binary_gate(scores, "identity", tau), terms, g_target.to(scores.dtype), g_polar.to(scores.dtype)


def gate_bank_backward(grad_gates: Tensor, grad_terms: Tensor, scores: Tensor, grad_target: Tensor,
                       grad_polar: Tensor, ste: str, tau: float) -> Tensor:
    """``ds = ste'(s) * dgates + dterms[1] * grad_target + dterms[2] * grad_polar``.

    Only the target and polar terms are differentiable; gradients arriving on
    the density or the non-finite count are ignored.
    """
    acc = _acc_dtype(scores.dtype)
    ds = binary_gate_backward(grad_gates, scores, ste, tau).to(acc)
    gt = grad_terms.to(acc)
    return (ds + gt[1] * grad_target.to(acc) + gt[2] * grad_polar.to(acc)).to(scores.dtype)


def _channel_view(gate: Tensor, x: Tensor) -> Tensor:
    """``gate`` (C,) shaped to broadcast along dim 1 of ``x`` (N, C, *)."""
    return gate.to(x.dtype).view((1, -1) + (1,) * (x.dim() - 2))


def channel_gate(x: Tensor, gate: Tensor) -> Tensor:
    """Activation gate ``y = x * g[c]`` (channel dim 1), memory format preserved.

    Every element is multiplied, closed channels included: a closed channel of a NaN or infinite ``x``
    is NaN, not 0 (every backend reads x there too; docs/DESIGN.md).
    """
    return x * _channel_view(gate, x)


def channel_gate_backward(grad: Tensor, x: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """``dx = dy * g[c]`` and ``dg[c] = sum over all but dim 1 of dy * x``, accumulated in float32 (float64
    for float64 inputs)."""
    dx = grad * _channel_view(gate, grad)
    dims = [0] + list(range(2, x.dim()))
    acc = _acc_dtype(x.dtype)
    dg = (grad.to(acc) * x.to(acc)).sum(dim=dims)
    return dx, dg.to(gate.dtype)


def gated_affine(weight: Tensor, bias: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """Gated BatchNorm affine: ``(gamma * g, beta * g)``."""
    g = gate.to(weight.dtype)
    return weight * g, bias * g.to(bias.dtype)


def gated_affine_backward(
    grad_weight: Tensor, grad_bias: Tensor, weight: Tensor, bias: Tensor, gate: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`gated_affine` for gamma, beta and the gate."""
    g = gate.to(weight.dtype)
    d_weight = grad_weight * g
    d_bias = grad_bias * g.to(bias.dtype)
    acc = _acc_dtype(gate.dtype)
    d_gate = grad_weight.to(acc) * weight.to(acc) + grad_bias.to(acc) * bias.to(acc)
    return d_weight, d_bias, d_gate.to(gate.dtype)
