"""channel_gate: the activation gate ``y = x * g[c]`` and its backward (``channel_gate_backward``: dx, dg).

Every provider (tests/ops/conftest.py: the reference, Triton, the CUDA extension) through opcheck, on views, with
NaN and inf in closed channels; the reference against the formula in every dtype and layout, and by gradcheck; the
kernels against the reference at odd sizes, in half types and float64 and past 65535 rows; Triton's grid-stride
and split paths; on a GPU, every dtype, sizes past the launch-grid limits and 2^24 elements, and bitwise
determinism."""
import math

import pytest
import torch

import polarprune_cuda as pp
from polarprune_cuda import ops
from polarprune_cuda.kernels import _grids as G
from polarprune_cuda.ops import reference

from helpers import (
    FLOATS, KERNEL_TOL, PROVIDERS, REFERENCE, assert_deterministic, assert_implements_the_schema, assert_same,
    gpu_only, tol, vector_view
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("name", PROVIDERS)
def test_implements_the_schema(name):
    for op in ("channel_gate", "channel_gate_backward"):
        assert_implements_the_schema(name, op)


#: opcheck (schema, fake, autograd registration, AOT dispatch) with each provider forced
OPCHECK = {
    "fp32": lambda p: ("channel_gate", (p.rand(2, 5, 3, 7, requires_grad=True), p.binary(5).requires_grad_())),
    "channels_last": lambda p: ("channel_gate", (p.rand(2, 5, 4, 4, channels_last=True, requires_grad=True),
                                                 p.binary(5).requires_grad_())),
    "backward": lambda p: ("channel_gate_backward", (p.rand(2, 5, 3, 7), p.rand(2, 5, 3, 7), p.binary(5))),
}
#: and on the reference, the registration in more dtypes and shapes (the kernels': against the reference, below)
OPCHECK_REFERENCE = {
    "bf16": lambda p: ("channel_gate", (p.rand(2, 5, 3, 3, dtype=torch.bfloat16, requires_grad=True),
                                        p.binary(5).requires_grad_())),
    "2d": lambda p: ("channel_gate", (p.rand(4, 5, requires_grad=True), p.binary(5).requires_grad_())),
}


@pytest.mark.parametrize("case", OPCHECK)
def test_opcheck(provider, case):
    name, args = OPCHECK[case](provider)
    torch.library.opcheck(ops.ALL_OPS[name], args)


@pytest.mark.parametrize("case", OPCHECK_REFERENCE)
def test_opcheck_on_the_reference(case):
    name, args = OPCHECK_REFERENCE[case](REFERENCE)
    torch.library.opcheck(ops.ALL_OPS[name], args)


# -------------------------------------- the reference's gradients and formula; every provider with NaN, inf and views
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 1, 1, 1), (3, 3, 7, 7), (2, 67, 5, 3)])
def test_gradcheck_on_the_reference(shape, channels_last):
    """A finite difference per element (a kernel's gradients: against the reference's backward, below, and through
    the op's autograd in test_opcheck)."""
    x = REFERENCE.rand(*shape, dtype=torch.float64, channels_last=channels_last, requires_grad=True)
    gate = (REFERENCE.rand(shape[1]) > 0).double().requires_grad_()
    assert torch.autograd.gradcheck(pp.functional.channel_gate, (x, gate))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_the_formula_and_keeps_the_layout(dtype, channels_last):
    """The reference through the op layer and autograd (the kernels: against the reference, below)."""
    x = REFERENCE.rand(3, 67, 5, 7, dtype=dtype, channels_last=channels_last, requires_grad=True)
    gate = (REFERENCE.rand(67) > 0).float().requires_grad_()
    y = pp.functional.channel_gate(x, gate)
    assert torch.equal(y, x.detach() * gate.detach().to(dtype).view(1, -1, 1, 1))
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    dy = REFERENCE.rand(*x.shape, dtype=dtype)
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy * gate.detach().to(dtype).view(1, -1, 1, 1))
    dg = (dy.double() * x.detach().double()).sum((0, 2, 3)).float()
    t = dict(atol=1e-4, rtol=1e-4) if dtype in (torch.float32, torch.float64) else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(gate.grad, dg, **t)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nonfinite_in_a_closed_channel(provider, channels_last, dtype):
    """A closed channel is x * 0, not 0: NaN and inf there give NaN in y, dx and dg (a diverging run is not hidden
    by a closed gate; docs/DESIGN.md), against the reference in float64."""
    x = provider.rand(2, 64, 4, 4, dtype=dtype, channels_last=channels_last)
    dy = provider.rand(2, 64, 4, 4, dtype=dtype, channels_last=channels_last)
    g = (provider.rand(64) > 0).to(dtype)
    g[[3, 10, 40]] = 0
    x[0, 3, 1, 2], x[1, 10, 0, 0], dy[1, 40, 3, 3] = math.nan, math.inf, -math.inf
    x[0, 5, 0, 1] = math.nan  # an open channel too
    y = provider.channel_gate(x, g)
    assert_same(y, reference.channel_gate(x.double(), g.double()).to(dtype))
    assert y[0, 3].isnan().any() and y[1, 10].isnan().any()
    dx, dg = provider.channel_gate_backward(dy, x, g)
    dx_ref, dg_ref = reference.channel_gate_backward(dy.double(), x.double(), g.double())
    assert_same(dx, dx_ref.to(dtype))
    assert dx[1, 40].isnan().any()
    assert_same(dg.double(), dg_ref, **tol(dtype, terms=32))
    assert dg[[3, 5]].isnan().all() and not dg[[10, 40]].isfinite().any()


def _view(p, view):
    return {"step2": lambda: p.rand(2, 10, 6, 10)[:, ::2, :, ::2],
            "expanded": lambda: p.rand(1, 5, 1, 7).expand(3, 5, 4, 7),
            "transposed": lambda: p.rand(2, 5, 7, 6).transpose(2, 3)}[view]()


@pytest.mark.parametrize("view", ["step2", "expanded", "transposed"])
def test_views(provider, view):
    """x, dy and the gate as strided, expanded or transposed views read as their contiguous copies."""
    x, dy = _view(provider, view), _view(provider, view)
    g = (vector_view(provider, "expanded" if view == "expanded" else "step2", 5) > 0).float()
    g[0] = 0
    xc, dyc = x.contiguous(), dy.contiguous()
    assert torch.equal(provider.channel_gate(x, g), reference.channel_gate(xc, g))
    dx, dg = provider.channel_gate_backward(dy, x, g)
    dx_ref, dg_ref = reference.channel_gate_backward(dyc, xc, g)
    assert torch.equal(dx, dx_ref)
    torch.testing.assert_close(dg, dg_ref, **tol(torch.float32, terms=84, scale=10))


# ---------------------------------------------------------------- the kernels against the reference
def _shape(n, c, hw):
    side = int(math.isqrt(hw))
    return (n, c, side, hw // side)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("n,c,hw", [(2, c, hw) for c in (1, 3, 67, 256) for hw in (1, 49, 3136)])
def test_kernels_match_the_reference_fp32(kernels, n, c, hw, channels_last):
    x = kernels.rand(*_shape(n, c, hw), channels_last=channels_last)
    g = (kernels.rand(c) > 0).float()
    g[0] = 0.0
    y = kernels.channel_gate(x, g)
    assert torch.equal(y, reference.channel_gate(x, g))
    assert y.stride() == x.stride()
    dy = kernels.rand(*x.shape, channels_last=channels_last)
    dx, dg = kernels.channel_gate_backward(dy, x, g)
    dx_ref, dg_ref = reference.channel_gate_backward(dy, x, g)
    assert torch.equal(dx, dx_ref)
    torch.testing.assert_close(dg, dg_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("n,c,hw", [(2, 3, 49), (3, 67, 49), (2, 256, 196)])
def test_kernels_match_the_reference_half(kernels, n, c, hw, channels_last, dtype):
    x = kernels.rand(*_shape(n, c, hw), dtype=dtype, channels_last=channels_last)
    g = (kernels.rand(c) > 0).to(dtype)
    assert torch.equal(kernels.channel_gate(x, g), reference.channel_gate(x, g))
    dy = kernels.rand(*x.shape, dtype=dtype)  # the gradient in another layout than x
    dx, dg = kernels.channel_gate_backward(dy, x, g)
    dx_ref, dg_ref = reference.channel_gate_backward(dy, x, g)
    assert torch.equal(dx, dx_ref)
    torch.testing.assert_close(dg, dg_ref, **KERNEL_TOL[dtype])


def test_kernels_are_deterministic_and_take_2d(kernels):
    x, dy = kernels.rand(4, 67, 20, 20), kernels.rand(4, 67, 20, 20)
    g = torch.ones(67, device=kernels.device)
    first = kernels.channel_gate_backward(dy, x, g)[1]
    assert all(torch.equal(first, kernels.channel_gate_backward(dy, x, g)[1]) for _ in range(3))
    x2 = kernels.rand(5, 67)
    assert torch.equal(kernels.channel_gate(x2, g), reference.channel_gate(x2, g))


def test_kernels_accumulate_float64_in_float64(kernels):
    """dg of float64 inputs is summed in float64 (not float32): agrees with the reference to 1e-12."""
    x = kernels.rand(3, 5, 40, 40, dtype=torch.float64) * 1e3
    dy = kernels.rand(3, 5, 40, 40, dtype=torch.float64) + 1e4
    g = torch.ones(5, dtype=torch.float64, device=kernels.device)
    dx, dg = kernels.channel_gate_backward(dy, x, g)
    dx_ref, dg_ref = reference.channel_gate_backward(dy, x, g)
    assert torch.equal(dx, dx_ref)
    torch.testing.assert_close(dg, dg_ref, rtol=1e-12, atol=1e-6)


def test_kernels_take_2d_rows_past_65535(kernels):
    """A 2-D (N, C) input with N > 65535 is addressed as rows: forward and backward agree with the reference."""
    x, dy = kernels.rand(70000, 3), kernels.rand(70000, 3)
    g = torch.tensor([1.0, 0.0, 1.0], device=kernels.device)
    assert torch.equal(kernels.channel_gate(x, g), reference.channel_gate(x, g))
    dx, dg = kernels.channel_gate_backward(dy, x, g)
    dx_ref, dg_ref = reference.channel_gate_backward(dy, x, g)
    assert torch.equal(dx, dx_ref)
    torch.testing.assert_close(dg, dg_ref, **tol(torch.float32, terms=70000, scale=300))
    x4 = kernels.rand(70000, 3, 1, 1, channels_last=True)
    assert torch.equal(kernels.channel_gate(x4, g), reference.channel_gate(x4, g))


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 3, 64, 80), (3, 67, 7, 9)])
def test_triton_grid_stride_and_split_paths(triton_kernels, monkeypatch, shape, channels_last):
    """Few programs for many tiles (kernels/_grids.py): the Triton forward loops inside its programs (grid-stride),
    the backward walks several row tiles per split (the HW split path), as past the grid limits on a GPU."""
    T = triton_kernels
    x, dy = T.rand(*shape, channels_last=channels_last), T.rand(*shape, channels_last=channels_last)
    g = (T.rand(shape[1]) > 0).float()
    want_y = reference.channel_gate(x, g)
    dx_ref, dg_ref = reference.channel_gate_backward(dy, x, g)
    N, C, H, W = shape
    for programs in (1, 3, 7):
        monkeypatch.setattr(G, "MAX_PROGRAMS", programs)
        monkeypatch.setattr(G, "BWD_PROGRAMS", programs)
        fwd = G.channel_gate_forward_plan(N, C, H * W, channels_last)
        bwd = G.channel_gate_backward_plan(N, C, H * W, channels_last)
        assert fwd.tiles > fwd.grid[0] and bwd.tiles_per_split > 1
        assert torch.equal(T.channel_gate(x, g), want_y)
        dx, dg = T.channel_gate_backward(dy, x, g)
        assert torch.equal(dx, dx_ref)
        torch.testing.assert_close(dg, dg_ref, **tol(torch.float32, terms=N * H * W, scale=10))


# ---------------------------------------------------------------- on a GPU
def assert_channel_gate(kernels, x, g, dy=None):
    """channel_gate and its backward on x against the reference computed in float64 (same values: x, dy and g are
    exact in float64), tolerances from the dtype and the reduction length."""
    y = kernels.channel_gate(x, g)
    want = reference.channel_gate(x.double(), g.double()).to(x.dtype)
    torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        assert y.stride() == x.stride()
    dy = kernels.rand(*x.shape, dtype=x.dtype) if dy is None else dy
    dx, dg = kernels.channel_gate_backward(dy, x, g)
    dx_ref, dg_ref = reference.channel_gate_backward(dy.double(), x.double(), g.double())
    torch.testing.assert_close(dx, dx_ref.to(x.dtype), rtol=0, atol=0, equal_nan=True)
    terms = x.numel() // max(x.shape[1], 1)
    torch.testing.assert_close(dg.double(), dg_ref, equal_nan=True, **tol(x.dtype, terms, terms ** 0.5))
    again = kernels.channel_gate_backward(dy, x, g)[1]
    assert torch.equal(dg.nan_to_num(), again.nan_to_num())   # deterministic, bit for bit


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("c,hw", [(1, 1), (3, 49), (67, 49), (256, 3136), (67, 3136), (64, 56 * 56)])
def test_gpu_channel_gate(kernels, dtype, channels_last, c, hw):
    side = int(math.isqrt(hw))
    x = kernels.rand(3, c, side, hw // side, dtype=dtype, channels_last=channels_last)
    assert_channel_gate(kernels, x, kernels.binary(c, dtype))


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_channel_gate_nan_in_a_closed_channel(kernels, dtype, channels_last):
    """A closed channel is x * 0: NaN and inf inputs give NaN there, as in the reference (DESIGN.md)."""
    x = kernels.rand(2, 8, 5, 5, dtype=dtype, channels_last=channels_last)
    g = torch.ones(8, device="cuda", dtype=dtype)
    g[[1, 6]] = 0
    x[0, 1, 2, 3], x[1, 6, 0, 0], x[1, 1, 4, 4] = math.nan, math.inf, -math.inf
    dy = kernels.rand(*x.shape, dtype=dtype)
    dy[0, 6, 1, 1] = math.nan
    assert_channel_gate(kernels, x, g, dy)
    y = kernels.channel_gate(x, g)
    assert y[0, 1, 2, 3].isnan() and y[1, 6, 0, 0].isnan() and y[1, 1, 4, 4].isnan()


@gpu_only
@pytest.mark.parametrize("case", ["sliced", "sliced-spatial", "expanded", "transposed", "2d", "3d", "5d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_channel_gate_views(kernels, case, dtype):
    base = kernels.rand(4, 12, 9, 10, dtype=dtype)
    x = {"sliced": lambda: base[1:3, ::2], "sliced-spatial": lambda: base[:, ::2, 1:, ::3],
         "expanded": lambda: kernels.rand(1, 12, 1, 10, dtype=dtype).expand(4, 12, 9, 10),
         "transposed": lambda: base.transpose(2, 3), "2d": lambda: kernels.rand(37, 12, dtype=dtype),
         "3d": lambda: kernels.rand(5, 12, 33, dtype=dtype),
         "5d": lambda: kernels.rand(2, 12, 3, 4, 5, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)}
    x = x[case]()
    g = kernels.binary(x.shape[1], dtype)
    assert_channel_gate(kernels, x, g, dy=kernels.rand(*x.shape, dtype=dtype))


@gpu_only
@pytest.mark.parametrize("shape,channels_last,dtype", [
    ((1, 64, 1024, 2048), True, torch.bfloat16),     # rows past 65535 blocks of the old (C, HW) grid
    ((1, 16, 3000, 3000), False, torch.float32),     # HW = 9 M: inner tiles past 65535
    ((70000, 3), False, torch.float32),              # 2-D (N, C) with N > 65535
    ((70000, 1), False, torch.float16),
    ((1, 8, 1 << 22), False, torch.float32),         # 2^25 elements: more than float32 counts exactly
], ids=["cl-1x64x1024x2048", "nchw-16x9M", "2d-70000x3", "2d-70000x1", "2^25"])
def test_gpu_channel_gate_past_grid_limits(kernels, shape, channels_last, dtype):
    x = kernels.rand(*shape, dtype=dtype, channels_last=channels_last)
    assert_channel_gate(kernels, x, kernels.binary(shape[1], dtype))


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
def test_gpu_backward_is_deterministic(kernels, dtype, channels_last):
    """Three runs on the same inputs, at a size that fills the device: bitwise equal outputs."""
    x = kernels.rand(32, 256, 56, 56, dtype=dtype, channels_last=channels_last)
    dy = kernels.rand(32, 256, 56, 56, dtype=dtype, channels_last=channels_last)
    g = kernels.binary(256, dtype)
    assert_deterministic(lambda: kernels.channel_gate_backward(dy, x, g))
