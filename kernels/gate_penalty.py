"""Triton kernel of ``gate_penalty``: value and gradient in one launch.

One program walks the score vector (sums, segment sums, bilinear cost terms,
then the gradient) in a fixed order, so the result is deterministic. With
``split`` the same launch serves ``gate_bank`` (gate_bank.py): it also writes
every hard gate and keeps the target and polar gradients apart.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import BLOCK, POLAR_CODES, POLAR_ZHUANG, acc_of, check_polar_form


# One function of about 90 lines on purpose: the fused penalty is one kernel launch (value, gradient, gates and
# terms in one pass over the scores) whose stages share the loaded block and its running sums; split into
# @triton.jit helpers they would pass a dozen values back and forth.
@triton.jit
def _penalty_kernel(s_ptr, w_ptr, off_ptr, pairs_ptr, coef_ptr, grad_ptr, loss_ptr, terms_ptr,
                    gates_ptr, gpolar_ptr,
                    n, num_segments, num_pairs, const, total, tau, rho, tw, pw, t,
                    FORM: tl.constexpr, HAS_PAIRS: tl.constexpr, KPAD: tl.constexpr, ACC: tl.constexpr,
                    SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    # SPLIT=False: grad = tw * dT/ds + pw * dP/ds and loss (gate_penalty).
    # SPLIT=True: gates, grad = dT/ds, gpolar = dP/ds (gate_bank); loss_ptr unused.
    ar = tl.arange(0, BLOCK)
    ks = tl.arange(0, KPAD)
    # segment k holds gates [off[k], off[k+1]); the segment of gate j is #{k : off[k+1] <= j}
    seg_end = tl.load(off_ptr + 1 + ks, mask=HAS_PAIRS & (ks < num_segments), other=9223372036854775807)
    sum_wp = tl.zeros((BLOCK,), ACC)
    sum_p = tl.zeros((BLOCK,), ACC)
    sum_bi = tl.zeros((BLOCK,), ACC)
    bad = tl.zeros((BLOCK,), ACC)
    seg_sum = tl.zeros((KPAD,), ACC)
    # pass 1: sums over all gates (and per segment)
    for start in range(0, n, BLOCK):
        offs = start + ar
        mask = offs < n
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC)
        p = tl.where(mask, 1.0 / (1.0 + tl.exp(-s / tau)), 0.0)
        sum_wp += w * p
        sum_p += p
        sum_bi += 4.0 * p * (1.0 - p)
        bad += tl.where(mask & ((s != s) | (tl.abs(s) == float("inf"))), 1.0, 0.0)
        if HAS_PAIRS:
            seg = tl.sum(tl.where(seg_end[None, :] <= offs[:, None], 1, 0), axis=1)
            onehot = tl.where(seg[:, None] == ks[None, :], 1.0, 0.0).to(ACC)
            seg_sum += tl.sum(onehot * p[:, None], axis=0)
    total_p = tl.sum(sum_p, axis=0)
    mean_p = total_p / n
    # pass 2 (Zhuang form): distances to the mean and their signs
    sum_abs = tl.zeros((BLOCK,), ACC)
    sum_sgn = tl.zeros((BLOCK,), ACC)
    if FORM == POLAR_ZHUANG:
        for start in range(0, n, BLOCK):
            offs = start + ar
            mask = offs < n
            s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
            c = tl.where(mask, 1.0 / (1.0 + tl.exp(-s / tau)) - mean_p, 0.0)
            sum_abs += tl.abs(c)
            sum_sgn += tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
    # bilinear cost terms over segment pairs
    quad = tl.sum(tl.zeros((KPAD,), ACC), axis=0)
    marginal = tl.zeros((KPAD,), ACC)
    if HAS_PAIRS:
        for l in range(0, num_pairs):
            a = tl.load(pairs_ptr + 2 * l)
            b = tl.load(pairs_ptr + 2 * l + 1)
            c = tl.load(coef_ptr + l).to(ACC)
            sa = tl.sum(tl.where(ks == a, seg_sum, 0.0), axis=0)
            sb = tl.sum(tl.where(ks == b, seg_sum, 0.0), axis=0)
            quad += c * sa * sb
            marginal += tl.where(ks == a, c * sb, 0.0) + tl.where(ks == b, c * sa, 0.0)
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
    # pass 3: the gradient (and, for the gate bank, the hard gates)
    scale = 2.0 / total * diff
    for start in range(0, n, BLOCK):
        offs = start + ar
        mask = offs < n
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
        d_cost = tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC)
        p = 1.0 / (1.0 + tl.exp(-s / tau))
        dp = p * (1.0 - p) / tau
        if HAS_PAIRS:
            seg = tl.sum(tl.where(seg_end[None, :] <= offs[:, None], 1, 0), axis=1)
            onehot = tl.where(seg[:, None] == ks[None, :], 1.0, 0.0).to(ACC)
            d_cost += tl.sum(onehot * marginal[None, :], axis=1)
        g_target = scale * d_cost * dp
        if FORM == POLAR_ZHUANG:
            c = p - mean_p
            sgn = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
            g_polar = (t - sgn + mean_sgn) / n * dp
        else:
            g_polar = 4.0 * (1.0 - 2.0 * p) / n * dp
        if SPLIT:
            tl.store(gates_ptr + offs, tl.where(s > 0, 1.0, 0.0).to(gates_ptr.dtype.element_ty), mask=mask)
            tl.store(grad_ptr + offs, g_target.to(grad_ptr.dtype.element_ty), mask=mask)
            tl.store(gpolar_ptr + offs, g_polar.to(gpolar_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(grad_ptr + offs, (tw * g_target + pw * g_polar).to(grad_ptr.dtype.element_ty), mask=mask)


def launch_penalty(scores, cost, seg_offsets, pairs, pair_coef, num_segments, const, total, tau, rho, tw, pw,
                    polar_form, t, split):
    check_polar_form(polar_form)
    acc = torch.promote_types(scores.dtype, torch.float32)
    n = scores.numel()
    has_pairs = pairs.numel() > 0
    kpad = triton.next_power_of_2(max(num_segments, 1)) if has_pairs else 1
    block = max(16, min(BLOCK, 8192 // kpad)) if has_pairs else BLOCK
    grad = torch.empty_like(scores)
    loss = torch.empty((), dtype=acc, device=scores.device)
    terms = torch.empty(4, dtype=acc, device=scores.device)
    gates = torch.empty_like(scores) if split else grad
    gpolar = torch.empty_like(scores) if split else grad
    _penalty_kernel[(1,)](
        scores.contiguous(), cost.contiguous(), seg_offsets.contiguous() if has_pairs else scores,
        pairs.contiguous() if has_pairs else scores, pair_coef.contiguous() if has_pairs else scores,
        grad, loss, terms, gates, gpolar, n, num_segments, pairs.shape[0],
        float(const), float(total), float(tau), float(rho), float(tw), float(pw), float(t),
        FORM=POLAR_CODES[polar_form], HAS_PAIRS=has_pairs, KPAD=kpad, ACC=acc_of(acc), SPLIT=split, BLOCK=block,
    )
    return loss, grad, terms, gates, gpolar


def gate_penalty(scores, cost, seg_offsets, pairs, pair_coef, num_segments, const, total, tau, rho,
                 target_weight, polar_weight, polar_form, t):
    loss, grad, terms, _, _ = launch_penalty(scores, cost, seg_offsets, pairs, pair_coef, num_segments, const, total,
                                              tau, rho, target_weight, polar_weight, polar_form, t, split=False)
    return loss, grad, terms
