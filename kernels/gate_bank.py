"""Triton kernels of ``gate_bank`` (gate_penalty.py's launch, split) and ``gate_bank_backward`` (one launch)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import BLOCK, STE_CLIPPED, STE_CODES, STE_SIGMOID, acc_of, check_ste, scalar, scalar_args
from ._grids import elementwise_grid
from .gate_penalty import launch_penalty


@triton.jit
def _gate_bank_bwd_kernel(dg_ptr, dterms_ptr, s_ptr, gt_ptr, gp_ptr, ds_ptr, args_ptr, n, tau, MODE: tl.constexpr,
                          ACC: tl.constexpr, IN_MEMORY: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dg = tl.load(dg_ptr + offs, mask=mask, other=0.0).to(ACC)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
    if MODE == STE_CLIPPED:
        dg = tl.where(tl.abs(s) <= 1, dg, 0.0)
    elif MODE == STE_SIGMOID:
        tau = scalar(args_ptr, tau, 0, IN_MEMORY)
        p = 1.0 / (1.0 + tl.exp(-s / tau))
        dg = dg * p * (1.0 - p) / tau
    d_target = tl.load(dterms_ptr + 1).to(ACC)
    d_polar = tl.load(dterms_ptr + 2).to(ACC)
    gt = tl.load(gt_ptr + offs, mask=mask, other=0.0).to(ACC)
    gp = tl.load(gp_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(ds_ptr + offs, (dg + d_target * gt + d_polar * gp).to(ds_ptr.dtype.element_ty), mask=mask)


def gate_bank(scores, ste, cost, seg_offsets, pairs, pair_coef, num_segments, const, total, tau, rho, polar_form, t):
    _, g_target, terms, gates, g_polar = launch_penalty(scores, cost, seg_offsets, pairs, pair_coef, num_segments,
                                                         const, total, tau, rho, 1.0, 1.0, polar_form, t, split=True)
    return gates, terms, g_target, g_polar


def gate_bank_backward(grad_gates, grad_terms, scores, grad_target, grad_polar, ste, tau):
    check_ste(ste)
    scores = scores.contiguous()
    ds = torch.empty_like(scores)
    n = scores.numel()
    if n:
        in_memory, args = scalar_args([tau], scores.dtype, scores)
        _gate_bank_bwd_kernel[elementwise_grid(n, BLOCK)](
            grad_gates.contiguous(), grad_terms.contiguous(), scores, grad_target.contiguous(),
            grad_polar.contiguous(), ds, args, n, float(tau), MODE=STE_CODES[ste], ACC=acc_of(scores.dtype),
            IN_MEMORY=in_memory, BLOCK=BLOCK)
    return ds
