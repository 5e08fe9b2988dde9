"""Triton kernels against reference.py (on CPU under TRITON_INTERPRET=1, or on a CUDA device)."""
import copy
import math

import pytest
import torch

import polarprune_cuda as pp
from polarprune_cuda import ops
from polarprune_cuda.ops import backends, reference
from polarprune_cuda.ops.cost import CostModel

from helpers import SmallNet, randn, tol
from helpers import _bilinear_model

T = pytest.importorskip("polarprune_cuda.kernels.triton_gates", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.gpu   # on a GPU they run there: the campaign selects them (pytest -m gpu)
if DEVICE == "cpu" and not backends.get_backend("triton").available:   # e.g. triton 3.6's interpreter, numpy 2.4+
    pytest.skip(backends.get_backend("triton").reason, allow_module_level=True)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float64: dict(rtol=1e-10, atol=1e-10)}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every tensor the kernels allocate starts as NaN (or a huge int), so an unwritten element fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(math.nan)
        elif t.dtype != torch.bool:
            t.fill_(12345)
        return t

    monkeypatch.setattr(T.torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(T.torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    yield
    monkeypatch.undo()


def rand(*shape, dtype=torch.float32, channels_last=False):
    t = torch.randn(*shape, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


@pytest.mark.parametrize("n", [1, 3, 67, 1000, 5003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_binary_gate_forward_is_exact(n, dtype):
    s = rand(n, dtype=dtype)
    s[0] = 0.0
    assert torch.equal(T.binary_gate(s, "identity", 1.0), reference.binary_gate(s, "identity", 1.0))


@pytest.mark.parametrize("ste", ["identity", "clipped", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_binary_gate_backward(ste, dtype):
    s, dg = rand(1031, dtype=dtype) * 2, rand(1031, dtype=dtype)
    torch.testing.assert_close(T.binary_gate_backward(dg, s, ste, 0.6),
                               reference.binary_gate_backward(dg, s, ste, 0.6), **TOL[dtype])


@pytest.mark.parametrize("form", ["zhuang", "bimodal"])
@pytest.mark.parametrize("kind", ["channels", "linear", "bilinear"])
@pytest.mark.parametrize("n", [1, 67, 3001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_penalty(form, kind, n, dtype):
    s = rand(n, dtype=dtype) * 2
    cm = {"channels": lambda: CostModel.channels(n), "linear": lambda: CostModel.linear_only(torch.rand(n) + 0.1),
          "bilinear": lambda: _bilinear_model(n, seed=n)}[kind]()
    args = cm.op_args(DEVICE) + (1.2, 0.45, 3.0, 0.4, form, 1.1)
    got, want = T.gate_penalty(s, *args), reference.gate_penalty(s, *args)
    for name, a, b in zip(("loss", "grad", "terms"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # float64 is float64 throughout: the float arguments (tau, rho, weights) reach the kernel through memory
        # (kernels/_common.scalar), not as fp32 launch arguments
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
        else:
            torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6, msg=name)


def test_penalty_counts_nonfinite():
    s = rand(100)
    s[[3, 50]] = torch.tensor([math.nan, -math.inf], device=DEVICE)
    _, _, terms = T.gate_penalty(s, *CostModel.channels(100).op_args(DEVICE), 1.0, 0.5, 1.0, 0.1, "bimodal", 1.0)
    assert terms[3].item() == 2


SHAPES = [(2, c, hw) for c in (1, 3, 67, 256) for hw in (1, 49, 3136)]


def _shape(n, c, hw):
    side = int(math.isqrt(hw))
    return (n, c, side, hw // side)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("n,c,hw", SHAPES)
def test_channel_gate_fp32(n, c, hw, channels_last):
    x = rand(*_shape(n, c, hw), channels_last=channels_last)
    g = (rand(c) > 0).float()
    g[0] = 0.0
    y = T.channel_gate(x, g)
    assert torch.equal(y, reference.channel_gate(x, g))
    assert y.stride() == x.stride()
    dy = rand(*x.shape, channels_last=channels_last)
    dx, dg = T.channel_gate_backward(dy, x, g)
    dx_ref, dg_ref = reference.channel_gate_backward(dy, x, g)
    assert torch.equal(dx, dx_ref)
    torch.testing.assert_close(dg, dg_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("n,c,hw", [(2, 3, 49), (3, 67, 49), (2, 256, 196)])
def test_channel_gate_half(n, c, hw, channels_last, dtype):
    x = rand(*_shape(n, c, hw), dtype=dtype, channels_last=channels_last)
    g = (rand(c) > 0).to(dtype)
    assert torch.equal(T.channel_gate(x, g), reference.channel_gate(x, g))
    dy = rand(*x.shape, dtype=dtype)  # the gradient in another layout than x
    dx, dg = T.channel_gate_backward(dy, x, g)
    dx_ref, dg_ref = reference.channel_gate_backward(dy, x, g)
    assert torch.equal(dx, dx_ref)
    torch.testing.assert_close(dg, dg_ref, **TOL[dtype])


def test_channel_gate_deterministic_and_2d():
    x, dy = rand(4, 67, 20, 20), rand(4, 67, 20, 20)
    g = torch.ones(67, device=DEVICE)
    first = T.channel_gate_backward(dy, x, g)[1]
    assert all(torch.equal(first, T.channel_gate_backward(dy, x, g)[1]) for _ in range(3))
    x2 = rand(5, 67)
    assert torch.equal(T.channel_gate(x2, g), reference.channel_gate(x2, g))


@pytest.mark.parametrize("c", [1, 3, 67, 256, 1500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_affine(c, dtype):
    w, b, g = rand(c, dtype=dtype), rand(c, dtype=dtype), (rand(c) > 0).to(dtype)
    for a, r in zip(T.gated_affine(w, b, g), reference.gated_affine(w, b, g)):
        assert torch.equal(a, r)
    gw, gb = rand(c, dtype=dtype), rand(c, dtype=dtype)
    for a, r in zip(T.gated_affine_backward(gw, gb, w, b, g), reference.gated_affine_backward(gw, gb, w, b, g)):
        torch.testing.assert_close(a, r, **TOL[dtype])


# ------------------------------------------------------------------ through the op layer, Triton forced
@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setenv("POLARPRUNE_BACKEND", "triton")
    backends._reset()
    assert pp.backend_info()["backends"]["triton"]["available"]
    yield
    backends._reset()


def test_opcheck_with_triton_forced(force_triton):
    s = rand(37).requires_grad_()
    x = rand(2, 5, 3, 7).requires_grad_()
    x_cl = rand(2, 5, 4, 4, channels_last=True).requires_grad_()
    g = (rand(5) > 0).float().requires_grad_()
    w, b = rand(5).requires_grad_(), rand(5).requires_grad_()
    cm = _bilinear_model(37).op_args(DEVICE)
    cases = [
        ("binary_gate", (s, "sigmoid", 0.8)),
        ("binary_gate_backward", (rand(37), rand(37), "clipped", 1.0)),
        ("gate_penalty", (s, *cm, 1.0, 0.5, 2.0, 0.3, "zhuang", 1.0)),
        ("channel_gate", (x, g)),
        ("channel_gate", (x_cl, g)),
        ("channel_gate_backward", (rand(2, 5, 3, 7), rand(2, 5, 3, 7), (rand(5) > 0).float())),
        ("gated_affine", (w, b, g)),
        ("gated_affine_backward", (rand(5), rand(5), rand(5), rand(5), (rand(5) > 0).float())),
    ]
    for name, args in cases:
        torch.library.opcheck(ops.ALL_OPS[name], args)


def test_compile_fullgraph_with_triton_forced(force_triton):
    torch._dynamo.reset()
    torch.manual_seed(11)
    eager = SmallNet().to(DEVICE)
    pp.bind_gates(eager)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    x = randn(2, 3, 6, 6).to(DEVICE)
    y_e, y_c = eager(x), compiled(x)
    torch.testing.assert_close(y_c, y_e, atol=1e-5, rtol=1e-5)
    (y_e.square().sum() + pp.PolarizationLoss(0.5)(eager)).backward()
    (y_c.square().sum() + pp.PolarizationLoss(0.5)(model)).backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("form", ["zhuang", "bimodal"])
@pytest.mark.parametrize("ste", ["identity", "clipped", "sigmoid"])
@pytest.mark.parametrize("n", [1, 67, 3001])
def test_gate_bank_kernels(form, ste, n):
    s = rand(n) * 2
    cm = _bilinear_model(n, seed=n) if n > 1 else CostModel.channels(1)
    args = (s, ste, *cm.op_args(DEVICE), 0.9, 0.45, form, 1.05)
    got, want = T.gate_bank(*args), reference.gate_bank(*args)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    dg, dterms = rand(n), rand(4)
    torch.testing.assert_close(T.gate_bank_backward(dg, dterms, s, got[2], got[3], ste, 0.9),
                               reference.gate_bank_backward(dg, dterms, s, want[2], want[3], ste, 0.9),
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ NaN, float64, views, grid paths
from polarprune_cuda.kernels import _grids as G  # noqa: E402


def _assert_same(a, b, **kw):
    """Equal values (NaN where the reference has NaN), within ``kw`` tolerances when given."""
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    torch.testing.assert_close(a, b, equal_nan=True, **(kw or dict(rtol=0, atol=0)))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_channel_gate_nonfinite_in_closed_channel(channels_last, dtype):
    """A closed channel is x * 0, as the reference: NaN and inf there give NaN in y, dx and dg."""
    x = rand(2, 64, 4, 4, dtype=dtype, channels_last=channels_last)
    dy = rand(2, 64, 4, 4, dtype=dtype, channels_last=channels_last)
    g = (rand(64) > 0).to(dtype)
    g[[3, 10, 40]] = 0
    x[0, 3, 1, 2], x[1, 10, 0, 0], dy[1, 40, 3, 3] = math.nan, math.inf, -math.inf
    x[0, 5, 0, 1] = math.nan  # an open channel too
    y = T.channel_gate(x, g)
    _assert_same(y, reference.channel_gate(x, g))
    assert y[0, 3].isnan().any() and y[1, 10].isnan().any()
    dx, dg = T.channel_gate_backward(dy, x, g)
    dx_ref, dg_ref = reference.channel_gate_backward(dy, x, g)
    _assert_same(dx, dx_ref)
    assert dx[1, 40].isnan().any()
    _assert_same(dg, dg_ref, **tol(dtype, terms=32))
    assert dg[[3, 5]].isnan().all() and not dg[[10, 40]].isfinite().any()


def test_channel_gate_backward_float64_accumulates_in_float64():
    """dg of float64 inputs is summed in float64 (not float32): agrees with the reference to 1e-12."""
    x = rand(3, 5, 40, 40, dtype=torch.float64) * 1e3
    dy = rand(3, 5, 40, 40, dtype=torch.float64) + 1e4
    g = torch.ones(5, dtype=torch.float64)
    dx, dg = T.channel_gate_backward(dy, x, g)
    dx_ref, dg_ref = reference.channel_gate_backward(dy, x, g)
    assert torch.equal(dx, dx_ref)
    torch.testing.assert_close(dg, dg_ref, rtol=1e-12, atol=1e-6)


@pytest.mark.parametrize("ste", ["identity", "clipped", "sigmoid"])
def test_float64_scalars_reach_the_kernels_as_float64(ste):
    """tau of a float64 launch travels through memory: binary_gate_backward and gate_bank agree to 1e-12."""
    s, dg = rand(300, dtype=torch.float64) * 2, rand(300, dtype=torch.float64)
    tau = 0.1 + 1e-9  # not representable in fp32
    torch.testing.assert_close(T.binary_gate_backward(dg, s, ste, tau), reference.binary_gate_backward(dg, s, ste, tau),
                               rtol=1e-12, atol=1e-12)
    cm = _bilinear_model(300, seed=3)
    args = (s, ste, *cm.op_args(DEVICE), tau, 0.45 + 1e-9, "zhuang", 1.05)
    got, want = T.gate_bank(*args), reference.gate_bank(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    dterms = rand(4, dtype=torch.float64)
    torch.testing.assert_close(T.gate_bank_backward(dg, dterms, s, got[2], got[3], ste, tau),
                               reference.gate_bank_backward(dg, dterms, s, want[2], want[3], ste, tau),
                               rtol=1e-12, atol=1e-12)


def _views(n):
    """Strided, expanded and sliced 1-D views of n elements (each reads other elements than a linear walk)."""
    base = rand(2 * n + 3)
    return {"step2": base[::2][:n], "sliced": base[3:3 + n], "expanded": base[:1].expand(n),
            "transposed": rand(n, 2).t()[1]}


@pytest.mark.parametrize("view", ["step2", "sliced", "expanded", "transposed"])
def test_vector_ops_on_views(view):
    """Every op that takes vectors reads a strided, expanded or sliced view as the reference does."""
    n = 67
    s, dg, w, b, g, gw = (_views(n)[view] * k for k in (2, 1, 1, 1, 1, 1))
    g = (g > 0).float()
    for ste in ("clipped", "sigmoid"):
        _assert_same(T.binary_gate(s, ste, 0.7), reference.binary_gate(s, ste, 0.7))
        torch.testing.assert_close(T.binary_gate_backward(dg, s, ste, 0.7),
                                   reference.binary_gate_backward(dg, s, ste, 0.7), **tol(torch.float32))
    cm = _bilinear_model(n, seed=5)
    args = cm.op_args(DEVICE) + (1.2, 0.45, 3.0, 0.4, "zhuang", 1.1)
    for a, r in zip(T.gate_penalty(s, *args), reference.gate_penalty(s, *args)):
        torch.testing.assert_close(a, r, rtol=2e-5, atol=1e-6)
    bank_args = (s, "sigmoid", *cm.op_args(DEVICE), 0.9, 0.45, "bimodal", 1.05)
    got, want = T.gate_bank(*bank_args), reference.gate_bank(*bank_args)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=2e-5, atol=1e-6)
    dterms = rand(8)[::2]
    torch.testing.assert_close(T.gate_bank_backward(dg, dterms, s, gw, w, "sigmoid", 0.9),
                               reference.gate_bank_backward(dg, dterms, s, gw, w, "sigmoid", 0.9),
                               **tol(torch.float32, terms=3))
    for a, r in zip(T.gated_affine(w, b, g), reference.gated_affine(w, b, g)):
        assert torch.equal(a, r)
    for a, r in zip(T.gated_affine_backward(gw, dg, w, b, g), reference.gated_affine_backward(gw, dg, w, b, g)):
        torch.testing.assert_close(a, r, **tol(torch.float32, terms=2))


@pytest.mark.parametrize("view", ["step2", "expanded", "transposed"])
def test_channel_gate_on_views(view):
    """x, dy and the gate as strided, expanded or transposed views."""
    base = {"step2": lambda: rand(2, 10, 6, 10)[:, ::2, :, ::2],
            "expanded": lambda: rand(1, 5, 1, 7).expand(3, 5, 4, 7),
            "transposed": lambda: rand(2, 5, 7, 6).transpose(2, 3)}[view]
    x, dy = base(), base()
    g = (_views(5)[view if view != "transposed" else "step2"] > 0).float()
    g[0] = 0
    assert torch.equal(T.channel_gate(x, g), reference.channel_gate(x, g))
    dx, dg = T.channel_gate_backward(dy, x, g)
    dx_ref, dg_ref = reference.channel_gate_backward(dy, x, g)
    assert torch.equal(dx, dx_ref)
    torch.testing.assert_close(dg, dg_ref, **tol(torch.float32, terms=84, scale=10))


def test_channel_gate_2d_rows_past_65535():
    """A 2-D (N, C) input with N > 65535 is addressed as rows: forward and backward agree with the reference."""
    x, dy = rand(70000, 3), rand(70000, 3)
    g = torch.tensor([1.0, 0.0, 1.0], device=DEVICE)
    assert torch.equal(T.channel_gate(x, g), reference.channel_gate(x, g))
    dx, dg = T.channel_gate_backward(dy, x, g)
    dx_ref, dg_ref = reference.channel_gate_backward(dy, x, g)
    assert torch.equal(dx, dx_ref)
    torch.testing.assert_close(dg, dg_ref, **tol(torch.float32, terms=70000, scale=300))
    x4 = rand(70000, 3, 1, 1, channels_last=True)
    assert torch.equal(T.channel_gate(x4, g), reference.channel_gate(x4, g))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 3, 64, 80), (3, 67, 7, 9)])
def test_channel_gate_grid_stride_and_split_paths(monkeypatch, shape, channels_last):
    """Few programs for many tiles: the forward loops inside its programs (grid-stride), the backward walks
    several row tiles per split (the HW split path), as past the grid limits on a GPU."""
    x, dy = rand(*shape, channels_last=channels_last), rand(*shape, channels_last=channels_last)
    g = (rand(shape[1]) > 0).float()
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
