"""Triton kernels of ``channel_gate`` (``y = x * g[c]``) and ``channel_gate_backward``.

One kernel for NCHW and channels_last (the tensor is addressed as (N, C, HW)
with its own strides, no copies); closed channels are written as zeros without
reading x; the backward writes dx and reduces dg in one pass over dy and x, in
fp32, in two deterministic stages (per-program partial sums, then a sum over a
fixed axis), with int64 offsets. Tensors whose spatial dimensions cannot be
addressed with one stride (a transposed or sliced view) are copied to a
contiguous layout first, and the result is copied into the output's layout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_of


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


def _tiles(C: int, HW: int, channels_fast: bool):
    block_c = min(triton.next_power_of_2(C), 64 if channels_fast else 16)
    block_hw = min(triton.next_power_of_2(max(HW, 1)), max(16, 2048 // block_c))
    return block_c, block_hw


def _addressable(t):
    """``t`` itself when its spatial dims merge into one stride, else a contiguous copy."""
    return t if _nchw_view(t) is not None else t.contiguous()


def channel_gate(x, gate):
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    x = _addressable(x)
    out = y if _nchw_view(y) is not None else torch.empty_like(x)
    view_x, view_y = _nchw_view(x), _nchw_view(out)
    N, C = x.shape[0], x.shape[1]
    HW = view_x[3]
    block_c, block_hw = _tiles(C, HW, view_x[1] == 1)
    grid = (N, triton.cdiv(C, block_c), triton.cdiv(HW, block_hw))
    _channel_gate_kernel[grid](x, gate.contiguous(), out, C, HW, *view_x[:3], *view_y[:3],
                               ACC=acc_of(x.dtype), BLOCK_C=block_c, BLOCK_HW=block_hw)
    if out is not y:
        y.copy_(out)
    return y


def channel_gate_backward(grad, x, gate):
    dx = torch.empty_like(grad)
    if x.numel() == 0:
        return dx, torch.zeros_like(gate)
    grad, x = _addressable(grad), _addressable(x)
    out = dx if _nchw_view(dx) is not None else torch.empty_like(grad)
    views = [_nchw_view(t) for t in (grad, x, out)]
    N, C = x.shape[0], x.shape[1]
    HW = views[1][3]
    block_c, block_hw = _tiles(C, HW, views[1][1] == 1)
    c_blocks = triton.cdiv(C, block_c)
    # split HW across programs when N * C-blocks alone would leave the GPU idle
    splits = max(1, min(triton.cdiv(HW, block_hw * 4), triton.cdiv(512, max(N * c_blocks, 1))))
    hw_per_prog = triton.cdiv(HW, splits)
    partial = torch.empty((N * splits, C), dtype=torch.float32, device=x.device)
    _channel_gate_bwd_kernel[(N, c_blocks, splits)](
        grad, x, gate.contiguous(), out, partial, C, HW, hw_per_prog,
        *views[0][:3], *views[1][:3], *views[2][:3], ACC=acc_of(grad.dtype), BLOCK_C=block_c, BLOCK_HW=block_hw)
    if out is not dx:
        dx.copy_(out)
    return dx, partial.sum(0).to(gate.dtype)
