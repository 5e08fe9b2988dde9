"""Triton kernel of ``gate_penalty``: value and gradient in one launch.

One program walks the score vector (sums, segment sums, bilinear cost terms,
then the gradient) segment by segment in a fixed order, so the result is
deterministic; the float arguments reach a float64 launch through memory
(``_common.scalar``), so float64 is float64 throughout. With
``split`` the same launch serves ``gate_bank`` (gate_bank.py): it also writes
every hard gate and keeps the target and polar gradients apart.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import POLAR_CODES, POLAR_ZHUANG, acc_of, check_polar_form, scalar, scalar_args
from ._grids import check_grid, next_power_of_2

#: Gates a step of the penalty program (one program: more lanes, fewer iterations); half for float64 (registers).
PENALTY_BLOCK = 2048


def penalty_warps(kpad: int) -> int:
    """Warps of the penalty program: 8, or 16 where the segment vectors (KPAD) are long."""
    return 16 if kpad >= 1024 else 8


@triton.jit
def _segment(off_ptr, k, num_walk, n, HAS_PAIRS: tl.constexpr):
    """Gates [lo, hi) of walk step k: segment k with pairs (segment 0 from gate 0, the last up to n, as the
    reference's searchsorted places them), else all gates in one step."""
    if HAS_PAIRS:
        lo = tl.where(k == 0, 0, tl.load(off_ptr + k))
        hi = tl.where(k == num_walk - 1, n, tl.minimum(tl.load(off_ptr + k + 1), n))
    else:
        lo = 0
        hi = n
    return lo, hi


# One function on purpose: the fused penalty is one kernel launch (value, gradient, gates and terms in one
# program over the scores) whose stages share running sums. With pairs it walks the gates segment by segment
# (segments are contiguous ranges of gates), so a segment's sum is one reduction and its marginal cost one
# scalar: no (gates x segments) one-hot tiles. Segment sums and marginals are KPAD vectors updated with
# tl.where(ks == k, ...). Everything runs in a fixed order: the result is deterministic.
@triton.jit
def _penalty_kernel(s_ptr, w_ptr, off_ptr, pairs_ptr, coef_ptr, grad_ptr, loss_ptr, terms_ptr,
                    gates_ptr, gpolar_ptr, args_ptr,
                    n, num_walk, num_pairs, const, total, tau, rho, tw, pw, t,
                    FORM: tl.constexpr, HAS_PAIRS: tl.constexpr, KPAD: tl.constexpr, ACC: tl.constexpr,
                    SPLIT: tl.constexpr, IN_MEMORY: tl.constexpr, BLOCK: tl.constexpr):
    # SPLIT=False: grad = tw * dT/ds + pw * dP/ds and loss (gate_penalty).
    # SPLIT=True: gates, grad = dT/ds, gpolar = dP/ds (gate_bank); loss_ptr unused.
    # IN_MEMORY (float64): the float arguments are read from args_ptr, not passed as fp32.
    const = scalar(args_ptr, const, 0, IN_MEMORY)
    total = scalar(args_ptr, total, 1, IN_MEMORY)
    inv_tau = 1.0 / scalar(args_ptr, tau, 2, IN_MEMORY)
    rho = scalar(args_ptr, rho, 3, IN_MEMORY)
    tw = scalar(args_ptr, tw, 4, IN_MEMORY)
    pw = scalar(args_ptr, pw, 5, IN_MEMORY)
    t = scalar(args_ptr, t, 6, IN_MEMORY)
    ar = tl.arange(0, BLOCK)
    ks = tl.arange(0, KPAD)
    sum_wp = tl.zeros((BLOCK,), ACC)
    sum_p = tl.zeros((BLOCK,), ACC)
    sum_bi = tl.zeros((BLOCK,), ACC)
    bad = tl.zeros((BLOCK,), tl.int32)
    seg_sum = tl.zeros((KPAD,), ACC)
    # pass 1: sums over all gates, segment by segment
    for k in range(0, num_walk):
        lo, hi = _segment(off_ptr, k, num_walk, n, HAS_PAIRS)
        seg_p = tl.zeros((BLOCK,), ACC)
        for start1 in range(lo, hi, BLOCK):
            offs1 = start1 + ar
            mask1 = offs1 < hi
            s1 = tl.load(s_ptr + offs1, mask=mask1, other=0.0).to(ACC)
            w1 = tl.load(w_ptr + offs1, mask=mask1, other=0.0).to(ACC)
            p1 = tl.where(mask1, 1.0 / (1.0 + tl.exp(-s1 * inv_tau)), 0.0)
            sum_wp += w1 * p1
            seg_p += p1
            if FORM != POLAR_ZHUANG:
                sum_bi += 4.0 * p1 * (1.0 - p1)
            bad += tl.where(mask1 & ((s1 != s1) | (tl.abs(s1) == float("inf"))), 1, 0)
        sum_p += seg_p
        if HAS_PAIRS:
            seg_sum = tl.where(ks == k, tl.sum(seg_p, axis=0), seg_sum)
    total_p = tl.sum(sum_p, axis=0)
    mean_p = total_p / n
    # pass 2 (Zhuang form): distances to the mean and their signs
    sum_abs = tl.zeros((BLOCK,), ACC)
    sum_sgn = tl.zeros((BLOCK,), ACC)
    if FORM == POLAR_ZHUANG:
        for start2 in range(0, n, BLOCK):
            offs2 = start2 + ar
            mask2 = offs2 < n
            s2 = tl.load(s_ptr + offs2, mask=mask2, other=0.0).to(ACC)
            c2 = tl.where(mask2, 1.0 / (1.0 + tl.exp(-s2 * inv_tau)) - mean_p, 0.0)
            sum_abs += tl.abs(c2)
            sum_sgn += tl.where(c2 > 0, 1.0, tl.where(c2 < 0, -1.0, 0.0))
    # bilinear cost terms over segment pairs
    quad = tl.sum(tl.zeros((KPAD,), ACC), axis=0)
    marginal = tl.zeros((KPAD,), ACC)
    if HAS_PAIRS:
        for l in range(0, num_pairs):
            a = tl.load(pairs_ptr + 2 * l)
            b = tl.load(pairs_ptr + 2 * l + 1)
            coef = tl.load(coef_ptr + l).to(ACC)
            sa = tl.sum(tl.where(ks == a, seg_sum, 0.0), axis=0)
            sb = tl.sum(tl.where(ks == b, seg_sum, 0.0), axis=0)
            quad += coef * sa * sb
            marginal += tl.where(ks == a, coef * sb, 0.0) + tl.where(ks == b, coef * sa, 0.0)
    value = const + tl.sum(sum_wp, axis=0) + quad
    density = value / total
    diff = density - rho
    target_term = diff * diff
    if FORM == POLAR_ZHUANG:
        polar_term = (t * total_p - tl.sum(sum_abs, axis=0)) / n
        mean_sgn = tl.sum(sum_sgn, axis=0) / n
    else:
        polar_term = tl.sum(sum_bi, axis=0) / n
        mean_sgn = 0.0
    tl.store(loss_ptr, (tw * target_term + pw * polar_term).to(loss_ptr.dtype.element_ty))
    tl.store(terms_ptr, density.to(terms_ptr.dtype.element_ty))
    tl.store(terms_ptr + 1, target_term.to(terms_ptr.dtype.element_ty))
    tl.store(terms_ptr + 2, polar_term.to(terms_ptr.dtype.element_ty))
    tl.store(terms_ptr + 3, tl.sum(bad, axis=0).to(terms_ptr.dtype.element_ty))
    # pass 3: the gradient (and, for the gate bank, the hard gates), segment by segment
    scale = 2.0 / total * diff
    # one division, not one per gate (a float64 division is a subroutine call); tl.cast, not n.to(): the runtime
    # passes an integer argument equal to 1 as a constexpr (a Python int), which has no .to()
    inv_n = 1.0 / tl.cast(n, ACC)
    for k in range(0, num_walk):
        lo, hi = _segment(off_ptr, k, num_walk, n, HAS_PAIRS)
        if HAS_PAIRS:
            m = tl.sum(tl.where(ks == k, marginal, 0.0), axis=0)
        else:
            m = 0.0
        for start3 in range(lo, hi, BLOCK):
            offs3 = start3 + ar
            mask3 = offs3 < hi
            s3 = tl.load(s_ptr + offs3, mask=mask3, other=0.0).to(ACC)
            d_cost = tl.load(w_ptr + offs3, mask=mask3, other=0.0).to(ACC) + m
            p = 1.0 / (1.0 + tl.exp(-s3 * inv_tau))
            dp = p * (1.0 - p) * inv_tau
            g_target = scale * d_cost * dp
            if FORM == POLAR_ZHUANG:
                cen = p - mean_p
                sgn = tl.where(cen > 0, 1.0, tl.where(cen < 0, -1.0, 0.0))
                g_polar = (t - sgn + mean_sgn) * inv_n * dp
            else:
                g_polar = 4.0 * (1.0 - 2.0 * p) * inv_n * dp
            if SPLIT:
                tl.store(gates_ptr + offs3, tl.where(s3 > 0, 1.0, 0.0).to(gates_ptr.dtype.element_ty), mask=mask3)
                tl.store(grad_ptr + offs3, g_target.to(grad_ptr.dtype.element_ty), mask=mask3)
                tl.store(gpolar_ptr + offs3, g_polar.to(gpolar_ptr.dtype.element_ty), mask=mask3)
            else:
                tl.store(grad_ptr + offs3, (tw * g_target + pw * g_polar).to(grad_ptr.dtype.element_ty), mask=mask3)


def launch_penalty(scores, cost, seg_offsets, pairs, pair_coef, num_segments, const, total, tau, rho, tw, pw,
                   polar_form, t, split):
    check_polar_form(polar_form)
    scores = scores.contiguous()
    acc = torch.promote_types(scores.dtype, torch.float32)
    n = scores.numel()
    has_pairs = pairs.numel() > 0 and num_segments > 0
    kpad = next_power_of_2(max(num_segments, 1)) if has_pairs else 1
    grad = torch.empty_like(scores)
    loss = torch.empty((), dtype=acc, device=scores.device)
    terms = torch.empty(4, dtype=acc, device=scores.device)
    gates = torch.empty_like(scores) if split else grad
    gpolar = torch.empty_like(scores) if split else grad
    values = [const, total, tau, rho, tw, pw, t]
    in_memory, args = scalar_args(values, acc, scores)
    _penalty_kernel[check_grid((1,))](
        scores, cost.contiguous(), seg_offsets.contiguous() if has_pairs else scores,
        pairs.contiguous() if has_pairs else scores, pair_coef.contiguous() if has_pairs else scores,
        grad, loss, terms, gates, gpolar, args, n, num_segments if has_pairs else 1, pairs.shape[0],
        *[float(v) for v in values],
        FORM=POLAR_CODES[polar_form], HAS_PAIRS=has_pairs, KPAD=kpad, ACC=acc_of(acc), SPLIT=split,
        IN_MEMORY=in_memory, BLOCK=PENALTY_BLOCK // (2 if in_memory else 1), num_warps=penalty_warps(kpad),
    )
    return loss, grad, terms, gates, gpolar


def gate_penalty(scores, cost, seg_offsets, pairs, pair_coef, num_segments, const, total, tau, rho,
                 target_weight, polar_weight, polar_form, t):
    loss, grad, terms, _, _ = launch_penalty(scores, cost, seg_offsets, pairs, pair_coef, num_segments, const, total,
                                              tau, rho, target_weight, polar_weight, polar_form, t, split=False)
    return loss, grad, terms
