"""Triton kernels against reference.py (on CPU under TRITON_INTERPRET=1, or on a CUDA device)."""
import copy
import math

import pytest
import torch

import polarprune_cuda as pp
from polarprune_cuda.ops import backends, core as ops, reference
from polarprune_cuda.ops.cost import CostModel

from helpers import SmallNet, randn
from helpers import _bilinear_model

T = pytest.importorskip("polarprune_cuda.kernels.triton_gates", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
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
        # Triton passes float arguments (tau, rho, weights) as fp32, so fp64 agrees to fp32 precision
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
