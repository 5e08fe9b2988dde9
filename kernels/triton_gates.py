"""Triton kernels for the gate ops, with the signatures of polarprune_cuda.ops.reference.

* gate bank: hard gates (one launch over the whole flat score vector) and the
  straight-through backward (one launch);
* penalty: value and gradient in one launch (one program walks the score
  vector: sums, segment sums, bilinear cost terms, then the gradient), in a
  fixed order, so the result is deterministic;
* whole bank (``gate_bank``): the same launch also writes every hard gate and
  keeps the target and polar gradients apart, so a training step computes all
  gates and the penalty in one launch and its backward in one more;
* activation gate ``y = x * g[c]``: one kernel for NCHW and channels_last (the
  tensor is addressed as (N, C, HW) with its own strides, no copies); closed
  channels are written as zeros without reading x; the backward writes dx and
  reduces dg in one pass over dy and x, in fp32, in two deterministic stages
  (per-program partial sums, then a sum over a fixed axis), with int64 offsets;
* gated affine ``(gamma * g, beta * g)`` and its backward, one launch each.

Tensors whose spatial dimensions cannot be addressed with one stride fall back
to the reference implementation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from polarprune_cuda.ops import reference

STE_CODES = {"identity": 0, "clipped": 1, "sigmoid": 2}
POLAR_CODES = {"zhuang": 0, "bimodal": 1}
BLOCK = 1024


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ----------------------------------------------------------------------------- gate bank

@triton.jit
def _binary_gate_kernel(s_ptr, g_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    g = tl.where(s > 0, 1.0, 0.0)
    tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _binary_gate_bwd_kernel(dg_ptr, s_ptr, ds_ptr, n, tau, MODE: tl.constexpr, ACC: tl.constexpr,
                            BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dg = tl.load(dg_ptr + offs, mask=mask, other=0.0).to(ACC)
    if MODE == 0:
        ds = dg
    elif MODE == 1:
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
        ds = tl.where(tl.abs(s) <= 1, dg, 0.0)
    else:
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
        p = 1.0 / (1.0 + tl.exp(-s / tau))
        ds = dg * p * (1.0 - p) / tau
    tl.store(ds_ptr + offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)


def binary_gate(scores, ste, tau):
    g = torch.empty_like(scores)
    n = scores.numel()
    if n:
        _binary_gate_kernel[(triton.cdiv(n, BLOCK),)](scores, g, n, BLOCK=BLOCK)
    return g


def binary_gate_backward(grad, scores, ste, tau):
    if ste not in STE_CODES:
        raise ValueError(f"ste must be one of {tuple(STE_CODES)}, got {ste!r}")
    grad = grad.contiguous()
    ds = torch.empty_like(scores)
    n = scores.numel()
    if n:
        _binary_gate_bwd_kernel[(triton.cdiv(n, BLOCK),)](grad, scores, ds, n, float(tau), MODE=STE_CODES[ste],
                                                           ACC=_acc(scores.dtype), BLOCK=BLOCK)
    return ds


# ----------------------------------------------------------------------------- penalty

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
    if FORM == 0:
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
    if FORM == 0:
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
        if FORM == 0:
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


@triton.jit
def _gate_bank_bwd_kernel(dg_ptr, dterms_ptr, s_ptr, gt_ptr, gp_ptr, ds_ptr, n, tau, MODE: tl.constexpr,
                          ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dg = tl.load(dg_ptr + offs, mask=mask, other=0.0).to(ACC)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
    if MODE == 1:
        dg = tl.where(tl.abs(s) <= 1, dg, 0.0)
    elif MODE == 2:
        p = 1.0 / (1.0 + tl.exp(-s / tau))
        dg = dg * p * (1.0 - p) / tau
    d_target = tl.load(dterms_ptr + 1).to(ACC)
    d_polar = tl.load(dterms_ptr + 2).to(ACC)
    gt = tl.load(gt_ptr + offs, mask=mask, other=0.0).to(ACC)
    gp = tl.load(gp_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(ds_ptr + offs, (dg + d_target * gt + d_polar * gp).to(ds_ptr.dtype.element_ty), mask=mask)


def _launch_penalty(scores, cost, seg_offsets, pairs, pair_coef, num_segments, const, total, tau, rho, tw, pw,
                    polar_form, t, split):
    if polar_form not in POLAR_CODES:
        raise ValueError(f"polar_form must be one of {tuple(POLAR_CODES)}, got {polar_form!r}")
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
        grad, loss, terms, gates, gpolar, n, num_segments, pairs.shape[0], float(const), float(total), float(tau), float(rho),
        float(tw), float(pw), float(t),
        FORM=POLAR_CODES[polar_form], HAS_PAIRS=has_pairs, KPAD=kpad, ACC=_acc(acc), SPLIT=split, BLOCK=block,
    )
    return loss, grad, terms, gates, gpolar


def gate_penalty(scores, cost, seg_offsets, pairs, pair_coef, num_segments, const, total, tau, rho,
                 target_weight, polar_weight, polar_form, t):
    loss, grad, terms, _, _ = _launch_penalty(scores, cost, seg_offsets, pairs, pair_coef, num_segments, const, total,
                                              tau, rho, target_weight, polar_weight, polar_form, t, split=False)
    return loss, grad, terms


def gate_bank(scores, ste, cost, seg_offsets, pairs, pair_coef, num_segments, const, total, tau, rho, polar_form, t):
    _, g_target, terms, gates, g_polar = _launch_penalty(scores, cost, seg_offsets, pairs, pair_coef, num_segments,
                                                         const, total, tau, rho, 1.0, 1.0, polar_form, t, split=True)
    return gates, terms, g_target, g_polar


def gate_bank_backward(grad_gates, grad_terms, scores, grad_target, grad_polar, ste, tau):
    if ste not in STE_CODES:
        raise ValueError(f"ste must be one of {tuple(STE_CODES)}, got {ste!r}")
    ds = torch.empty_like(scores)
    n = scores.numel()
    if n:
        _gate_bank_bwd_kernel[(triton.cdiv(n, BLOCK),)](
            grad_gates.contiguous(), grad_terms.contiguous(), scores, grad_target.contiguous(),
            grad_polar.contiguous(), ds, n, float(tau), MODE=STE_CODES[ste], ACC=_acc(scores.dtype), BLOCK=BLOCK)
    return ds


# ----------------------------------------------------------------------------- activation gate

def _nchw_view(x: torch.Tensor):
    """(stride_n, stride_c, stride_hw, hw) addressing x as (N, C, HW), or None if the spatial dims don't merge."""
    spatial = x.shape[2:]
    hw = 1
    for d in spatial:
        hw *= d
    if not spatial or hw == 1:
        return x.stride(0), x.stride(1), 1, hw
    strides = x.stride()[2:]
    dims = [(d, s) for d, s in zip(spatial, strides) if d != 1]
    for (d_hi, s_hi), (d_lo, s_lo) in zip(dims, dims[1:]):
        if s_hi != s_lo * d_lo:
            return None
    return x.stride(0), x.stride(1), dims[-1][1], hw


@triton.jit
def _channel_gate_kernel(x_ptr, g_ptr, y_ptr, C, HW, xs_n, xs_c, xs_hw, ys_n, ys_c, ys_hw,
                         ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hws = tl.program_id(2).to(tl.int64) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cmask = cs < C
    g = tl.load(g_ptr + cs, mask=cmask, other=0.0)
    mask = cmask[:, None] & (hws < HW)[None, :]
    open_ = mask & (g != 0)[:, None]
    x = tl.load(x_ptr + n * xs_n + cs[:, None].to(tl.int64) * xs_c + hws[None, :] * xs_hw, mask=open_, other=0.0)
    y = x.to(ACC) * g[:, None].to(ACC)   # exact: g is 0 or 1 (arithmetic in ACC: half types stay exact)
    tl.store(y_ptr + n * ys_n + cs[:, None].to(tl.int64) * ys_c + hws[None, :] * ys_hw,
             y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_gate_bwd_kernel(dy_ptr, x_ptr, g_ptr, dx_ptr, part_ptr, C, HW, hw_per_prog,
                             ds_n, ds_c, ds_hw, xs_n, xs_c, xs_hw, dxs_n, dxs_c, dxs_hw,
                             ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    cmask = cs < C
    g = tl.load(g_ptr + cs, mask=cmask, other=0.0)
    acc = tl.zeros((BLOCK_C,), tl.float32)
    lo = split.to(tl.int64) * hw_per_prog
    for start in range(0, hw_per_prog, BLOCK_HW):
        hws = lo + start + tl.arange(0, BLOCK_HW)
        mask = cmask[:, None] & ((hws < HW) & (hws < lo + hw_per_prog))[None, :]
        c64 = cs[:, None].to(tl.int64)
        dy = tl.load(dy_ptr + n * ds_n + c64 * ds_c + hws[None, :] * ds_hw, mask=mask, other=0.0)
        x = tl.load(x_ptr + n * xs_n + c64 * xs_c + hws[None, :] * xs_hw, mask=mask, other=0.0)
        tl.store(dx_ptr + n * dxs_n + c64 * dxs_c + hws[None, :] * dxs_hw,
                 (dy.to(ACC) * g[:, None].to(ACC)).to(dx_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(dy.to(tl.float32) * x.to(tl.float32), axis=1)
    row = n * tl.num_programs(2) + split
    tl.store(part_ptr + row * C + cs, acc, mask=cmask)


def _blocks(C: int, HW: int, channels_fast: bool):
    block_c = min(triton.next_power_of_2(C), 64 if channels_fast else 16)
    block_hw = min(triton.next_power_of_2(max(HW, 1)), max(16, 2048 // block_c))
    return block_c, block_hw


def channel_gate(x, gate):
    if x.numel() == 0:
        return torch.empty_like(x)
    view_x = _nchw_view(x)
    y = torch.empty_like(x)
    view_y = _nchw_view(y)
    if view_x is None or view_y is None:
        return reference.channel_gate(x, gate)
    N, C = x.shape[0], x.shape[1]
    HW = view_x[3]
    block_c, block_hw = _blocks(C, HW, view_x[1] == 1)
    grid = (N, triton.cdiv(C, block_c), triton.cdiv(HW, block_hw))
    _channel_gate_kernel[grid](x, gate.contiguous(), y, C, HW, *view_x[:3], *view_y[:3],
                               ACC=_acc(x.dtype), BLOCK_C=block_c, BLOCK_HW=block_hw)
    return y


def channel_gate_backward(grad, x, gate):
    dx = torch.empty_like(grad)
    views = [_nchw_view(t) for t in (grad, x, dx)]
    if any(v is None for v in views) or x.numel() == 0:
        return reference.channel_gate_backward(grad, x, gate)
    N, C = x.shape[0], x.shape[1]
    HW = views[1][3]
    block_c, block_hw = _blocks(C, HW, views[1][1] == 1)
    c_blocks = triton.cdiv(C, block_c)
    # split HW across programs when N * C-blocks alone would leave the GPU idle
    splits = max(1, min(triton.cdiv(HW, block_hw * 4), triton.cdiv(512, max(N * c_blocks, 1))))
    hw_per_prog = triton.cdiv(HW, splits)
    partial = torch.empty((N * splits, C), dtype=torch.float32, device=x.device)
    _channel_gate_bwd_kernel[(N, c_blocks, splits)](
        grad, x, gate.contiguous(), dx, partial, C, HW, hw_per_prog,
        *views[0][:3], *views[1][:3], *views[2][:3], ACC=_acc(grad.dtype), BLOCK_C=block_c, BLOCK_HW=block_hw)
    return dx, partial.sum(0).to(gate.dtype)


# ----------------------------------------------------------------------------- gated affine

@triton.jit
def _gated_affine_kernel(w_ptr, b_ptr, g_ptr, wo_ptr, bo_ptr, C, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0)
    tl.store(wo_ptr + offs, (w.to(ACC) * g.to(ACC)).to(wo_ptr.dtype.element_ty), mask=mask)
    tl.store(bo_ptr + offs, (b.to(ACC) * g.to(ACC)).to(bo_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_affine_bwd_kernel(gw_ptr, gb_ptr, w_ptr, b_ptr, g_ptr, dw_ptr, db_ptr, dg_ptr, C,
                             ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    gw = tl.load(gw_ptr + offs, mask=mask, other=0.0)
    gb = tl.load(gb_ptr + offs, mask=mask, other=0.0)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0)
    tl.store(dw_ptr + offs, (gw.to(ACC) * g.to(ACC)).to(dw_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + offs, (gb.to(ACC) * g.to(ACC)).to(db_ptr.dtype.element_ty), mask=mask)
    dg = gw.to(ACC) * w.to(ACC) + gb.to(ACC) * b.to(ACC)
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)


def gated_affine(weight, bias, gate):
    wo, bo = torch.empty_like(weight), torch.empty_like(bias)
    C = weight.numel()
    if C:
        _gated_affine_kernel[(triton.cdiv(C, BLOCK),)](weight.contiguous(), bias.contiguous(), gate.contiguous(),
                                                      wo, bo, C, ACC=_acc(weight.dtype), BLOCK=BLOCK)
    return wo, bo


def gated_affine_backward(grad_weight, grad_bias, weight, bias, gate):
    dw, db, dg = torch.empty_like(weight), torch.empty_like(bias), torch.empty_like(gate)
    C = weight.numel()
    if C:
        _gated_affine_bwd_kernel[(triton.cdiv(C, BLOCK),)](
            grad_weight.contiguous(), grad_bias.contiguous(), weight.contiguous(), bias.contiguous(),
            gate.contiguous(), dw, db, dg, C, ACC=_acc(torch.promote_types(gate.dtype, torch.float32)), BLOCK=BLOCK)
    return dw, db, dg


IMPLEMENTATIONS = {
    "binary_gate": binary_gate,
    "binary_gate_backward": binary_gate_backward,
    "gate_penalty": gate_penalty,
    "channel_gate": channel_gate,
    "channel_gate_backward": channel_gate_backward,
    "gated_affine": gated_affine,
    "gated_affine_backward": gated_affine_backward,
    "gate_bank": gate_bank,
    "gate_bank_backward": gate_bank_backward,
}
