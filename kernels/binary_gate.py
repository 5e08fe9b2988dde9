"""Triton kernels of ``binary_gate`` (hard gates) and ``binary_gate_backward`` (straight-through); one launch each."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import BLOCK, STE_CLIPPED, STE_CODES, STE_IDENTITY, acc_of, check_ste, scalar, scalar_args
from ._grids import elementwise_grid


@triton.jit
def _binary_gate_kernel(s_ptr, g_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    g = tl.where(s > 0, 1.0, 0.0)
    tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _binary_gate_bwd_kernel(dg_ptr, s_ptr, ds_ptr, args_ptr, n, tau, MODE: tl.constexpr, ACC: tl.constexpr,
                            IN_MEMORY: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dg = tl.load(dg_ptr + offs, mask=mask, other=0.0).to(ACC)
    if MODE == STE_IDENTITY:
        ds = dg
    elif MODE == STE_CLIPPED:
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
        ds = tl.where(tl.abs(s) <= 1, dg, 0.0)
    else:
        tau = scalar(args_ptr, tau, 0, IN_MEMORY)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
        p = 1.0 / (1.0 + tl.exp(-s / tau))
        ds = dg * p * (1.0 - p) / tau
    tl.store(ds_ptr + offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)


def binary_gate(scores, ste, tau):
    scores = scores.contiguous()
    g = torch.empty_like(scores)
    n = scores.numel()
    if n:
        _binary_gate_kernel[elementwise_grid(n, BLOCK)](scores, g, n, BLOCK=BLOCK)
    return g


def binary_gate_backward(grad, scores, ste, tau):
    check_ste(ste)
    grad, scores = grad.contiguous(), scores.contiguous()
    ds = torch.empty_like(scores)
    n = scores.numel()
    if n:
        in_memory, args = scalar_args([tau], scores.dtype, scores)
        _binary_gate_bwd_kernel[elementwise_grid(n, BLOCK)](grad, scores, ds, args, n, float(tau),
                                                            MODE=STE_CODES[ste], ACC=acc_of(scores.dtype),
                                                            IN_MEMORY=in_memory, BLOCK=BLOCK)
    return ds
