"""Triton kernels of ``gated_affine`` (``(gamma * g, beta * g)``) and its backward, one launch each."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import BLOCK, acc_of
from ._grids import elementwise_grid


@triton.jit
def _gated_affine_kernel(w_ptr, b_ptr, g_ptr, wo_ptr, bo_ptr, C, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0)
    tl.store(wo_ptr + offs, (w.to(ACC) * g.to(ACC)).to(wo_ptr.dtype.element_ty), mask=mask)
    tl.store(bo_ptr + offs, (b.to(ACC) * g.to(ACC)).to(bo_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_affine_bwd_kernel(gw_ptr, gb_ptr, w_ptr, b_ptr, g_ptr, dw_ptr, db_ptr, dg_ptr, C,
                             ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
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
    weight, bias, gate = weight.contiguous(), bias.contiguous(), gate.contiguous()
    wo, bo = torch.empty_like(weight), torch.empty_like(bias)
    C = weight.numel()
    if C:
        _gated_affine_kernel[elementwise_grid(C, BLOCK)](weight, bias, gate, wo, bo, C, ACC=acc_of(weight.dtype),
                                                         BLOCK=BLOCK)
    return wo, bo


def gated_affine_backward(grad_weight, grad_bias, weight, bias, gate):
    weight, bias, gate = weight.contiguous(), bias.contiguous(), gate.contiguous()
    dw, db, dg = torch.empty_like(weight), torch.empty_like(bias), torch.empty_like(gate)
    C = weight.numel()
    if C:
        _gated_affine_bwd_kernel[elementwise_grid(C, BLOCK)](
            grad_weight.contiguous(), grad_bias.contiguous(), weight, bias, gate, dw, db, dg, C,
            ACC=acc_of(torch.promote_types(gate.dtype, torch.float32)), BLOCK=BLOCK)
    return dw, db, dg
