"""Triton kernels of ``channel_gate`` (``y = x * g[c]``) and ``channel_gate_backward``.

One kernel for NCHW and channels_last: the tensor is addressed as (N, C, HW)
with its own strides, no copies; a tensor without spatial extent ((N, C), or
(N, C, 1, 1)) is addressed as rows, (1, C, N), so N may be any size. The tiles
and launch grids come from ``_grids.py`` (1-D grids, the big product on axis
0, within every hardware limit). Every element is read and multiplied, closed
channels included: a closed channel is ``x * 0`` as in the reference (NaN or
inf stays NaN), and ``dx = dy * g`` likewise. Arithmetic runs in the
accumulation type (float64 for float64, else float32). The backward writes dx
and reduces dg in one pass over dy and x, in the accumulation type, in two
deterministic stages (per-program partial sums, then a sum over a fixed axis),
with int64 offsets. Tensors whose spatial dimensions cannot be addressed with
one stride (a transposed or sliced view) are copied to a contiguous layout
first, and the result is copied into the output's layout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_of
from ._grids import channel_gate_backward_plan, channel_gate_forward_plan


def _nchw_view(x: torch.Tensor):
    """(N, HW, stride_n, stride_c, stride_hw) addressing x as (N, C, HW), or None if the spatial dims don't merge.

    Without spatial extent (HW == 1) the rows become the positions: (1, N, 0, stride_c, stride_n).
    """
    spatial = x.shape[2:]
    hw = 1
    for d in spatial:
        hw *= d
    if hw == 1:
        return 1, x.shape[0], 0, x.stride(1), x.stride(0)
    strides = x.stride()[2:]
    dims = [(d, s) for d, s in zip(spatial, strides) if d != 1]
    for (d_hi, s_hi), (d_lo, s_lo) in zip(dims, dims[1:]):
        if s_hi != s_lo * d_lo:
            return None
    return x.shape[0], hw, x.stride(0), x.stride(1), dims[-1][1]


@triton.jit
def _channel_gate_kernel(x_ptr, g_ptr, y_ptr, C, HW, c_blocks, hw_tiles, tiles, xs_n, xs_c, xs_hw,
                         ys_n, ys_c, ys_hw, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                         EVEN: tl.constexpr):
    # grid-stride over the tiles t = (n * hw_tiles + hb) * c_blocks + cb (one iteration unless tiles > grid)
    for t in range(tl.program_id(0).to(tl.int64), tiles, tl.num_programs(0)):
        cb = t % c_blocks
        r = t // c_blocks
        n = r // hw_tiles
        hb = r % hw_tiles
        cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        hws = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)
        x_offs = n * xs_n + cs[:, None] * xs_c + hws[None, :] * xs_hw
        y_offs = n * ys_n + cs[:, None] * ys_c + hws[None, :] * ys_hw
        if EVEN:
            g = tl.load(g_ptr + cs)
            x = tl.load(x_ptr + x_offs)
        else:
            cmask = cs < C
            mask = cmask[:, None] & (hws < HW)[None, :]
            g = tl.load(g_ptr + cs, mask=cmask, other=0.0)
            x = tl.load(x_ptr + x_offs, mask=mask, other=0.0)
        y = (x.to(ACC) * g[:, None].to(ACC)).to(y_ptr.dtype.element_ty)  # closed: x * 0 (NaN stays NaN)
        if EVEN:
            tl.store(y_ptr + y_offs, y)
        else:
            tl.store(y_ptr + y_offs, y, mask=mask)


@triton.jit
def _channel_gate_bwd_kernel(dy_ptr, x_ptr, g_ptr, dx_ptr, part_ptr, C, HW, c_blocks, hw_tiles, rows,
                             tiles_per_split, ds_n, ds_c, ds_hw, xs_n, xs_c, xs_hw, dxs_n, dxs_c, dxs_hw,
                             ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                             EVEN: tl.constexpr):
    pid = tl.program_id(0)
    cb = pid % c_blocks
    split = pid // c_blocks
    cs = cb.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    if EVEN:
        g = tl.load(g_ptr + cs)
    else:
        g = tl.load(g_ptr + cs, mask=cmask, other=0.0)
    acc = tl.zeros((BLOCK_C, BLOCK_HW), ACC)
    lo = split.to(tl.int64) * tiles_per_split
    hi = tl.minimum(lo + tiles_per_split, rows)
    for r in range(lo, hi):
        n = r // hw_tiles
        hws = (r % hw_tiles) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        dy_offs = n * ds_n + cs[:, None] * ds_c + hws[None, :] * ds_hw
        x_offs = n * xs_n + cs[:, None] * xs_c + hws[None, :] * xs_hw
        dx_offs = n * dxs_n + cs[:, None] * dxs_c + hws[None, :] * dxs_hw
        if EVEN:
            dy = tl.load(dy_ptr + dy_offs)
            x = tl.load(x_ptr + x_offs)
        else:
            mask = cmask[:, None] & (hws < HW)[None, :]
            dy = tl.load(dy_ptr + dy_offs, mask=mask, other=0.0)
            x = tl.load(x_ptr + x_offs, mask=mask, other=0.0)
        dx = (dy.to(ACC) * g[:, None].to(ACC)).to(dx_ptr.dtype.element_ty)
        if EVEN:
            tl.store(dx_ptr + dx_offs, dx)
        else:
            tl.store(dx_ptr + dx_offs, dx, mask=mask)
        acc += dy.to(ACC) * x.to(ACC)
    tl.store(part_ptr + split.to(tl.int64) * C + cs, tl.sum(acc, axis=1), mask=cmask)


def _addressable(t):
    """``t`` itself when its spatial dims merge into one stride, else a contiguous copy."""
    return t if _nchw_view(t) is not None else t.contiguous()


def channel_gate(x, gate):
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    x, gate = _addressable(x), gate.contiguous()
    out = y if _nchw_view(y) is not None else torch.empty_like(x)
    (N, HW, *xs), (_, _, *ys) = _nchw_view(x), _nchw_view(out)
    C = x.shape[1]
    plan = channel_gate_forward_plan(N, C, HW, channels_fast=xs[1] == 1)
    _channel_gate_kernel[plan.grid](x, gate, out, C, HW, plan.c_blocks, plan.hw_tiles, plan.tiles, *xs, *ys,
                                    ACC=acc_of(x.dtype), BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw,
                                    EVEN=plan.even)
    if out is not y:
        y.copy_(out)
    return y


def channel_gate_backward(grad, x, gate):
    dx = torch.empty_like(grad)
    if x.numel() == 0:
        return dx, torch.zeros_like(gate)
    grad, x, gate = _addressable(grad), _addressable(x), gate.contiguous()
    out = dx if _nchw_view(dx) is not None else torch.empty_like(grad)
    views = [_nchw_view(t) for t in (grad, x, out)]
    N, HW = views[1][:2]
    C = x.shape[1]
    acc = torch.promote_types(x.dtype, torch.float32)
    plan = channel_gate_backward_plan(N, C, HW, channels_fast=views[1][3] == 1)
    partial = torch.empty((plan.splits, C), dtype=acc, device=x.device)
    _channel_gate_bwd_kernel[plan.grid](
        grad, x, gate, out, partial, C, HW, plan.c_blocks, plan.hw_tiles, plan.rows, plan.tiles_per_split,
        *views[0][2:], *views[1][2:], *views[2][2:], ACC=acc_of(acc), BLOCK_C=plan.block_c,
        BLOCK_HW=plan.block_hw, EVEN=plan.even)
    if out is not dx:
        dx.copy_(out)
    return dx, partial.sum(0).to(gate.dtype)
