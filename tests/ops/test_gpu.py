"""The kernels on a GPU: every op of the CUDA extension and of Triton against the float64 reference, per dtype
(fp32, fp16, bf16, fp64) and layout, at odd sizes, views, NaN in closed channels, past 2^24 elements and past the
launch-grid limits, and bitwise determinism of every reduction.

Marked ``gpu``: the GPU campaign runs ``pytest -m gpu`` (benchmarks/gpu_first.sh); without a GPU every test here
skips. Outputs land in memory poisoned with NaN (poison_allocator) unless the caching allocator is off (the
compute-sanitizer run), so an element a kernel leaves unwritten fails the comparison.
"""
import math
import os
import types

import pytest
import torch

import polarprune_cuda as pp
from polarprune_cuda.ops import backends, reference
from polarprune_cuda.ops.cost import CostModel

from helpers import _bilinear_model, tol

HAS_GPU = torch.cuda.is_available()
PROVIDERS = ("cuda", "triton")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def poison_allocator():
    """Fill freed blocks of both pools of PyTorch's caching allocator with 0xFF bytes (NaN in every float
    dtype): the small pool (blocks of at most 1 MB, which serves most outputs here) and the large pool."""
    held = []
    for nbytes in (512, 4096, 65536, 262144, 1 << 20):            # small pool: many blocks of each size
        held += [torch.full((nbytes,), 255, dtype=torch.uint8, device="cuda") for _ in range(64)]
    for nbytes in (4 << 20, 16 << 20, 64 << 20, 256 << 20):        # large pool
        held += [torch.full((nbytes,), 255, dtype=torch.uint8, device="cuda") for _ in range(2)]
    torch.cuda.synchronize()
    del held


@pytest.fixture(params=PROVIDERS)
def C(request):
    """The kernels of one provider (the CUDA extension, Triton), called with the reference signatures."""
    b = backends.get_backend(request.param)
    if not b.available:
        pytest.skip(f"{request.param} backend unavailable: {b.reason}")
    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") != "1":
        poison_allocator()   # an output element a kernel leaves unwritten is NaN, and the comparison fails
    return types.SimpleNamespace(name=request.param, **b.ops)


def rand(*shape, dtype=torch.float32, channels_last=False):
    t = torch.randn(*shape, device="cuda", dtype=torch.float64).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def binary(c, dtype, closed=0):
    g = (torch.rand(c, device="cuda") > 0.5).to(dtype)
    g[closed] = 0
    return g


def assert_channel_gate(C, x, g, dy=None, exact_dx=True):
    """channel_gate and its backward on x against the reference computed in float64 (same values: x, dy
    and g are exact in float64), tolerances from the dtype and the reduction length."""
    y = C.channel_gate(x, g)
    want = reference.channel_gate(x.double(), g.double()).to(x.dtype)
    torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        assert y.stride() == x.stride()
    dy = rand(*x.shape, dtype=x.dtype) if dy is None else dy
    dx, dg = C.channel_gate_backward(dy, x, g)
    dx_ref, dg_ref = reference.channel_gate_backward(dy.double(), x.double(), g.double())
    torch.testing.assert_close(dx, dx_ref.to(x.dtype), rtol=0, atol=0, equal_nan=True)
    terms = x.numel() // max(x.shape[1], 1)
    torch.testing.assert_close(dg.double(), dg_ref, equal_nan=True, **tol(x.dtype, terms, terms ** 0.5))
    again = C.channel_gate_backward(dy, x, g)[1]
    assert torch.equal(dg.nan_to_num(), again.nan_to_num())   # deterministic, bit for bit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ste", ["identity", "clipped", "sigmoid"])
def test_gpu_gate_kernels(C, dtype, ste):
    s, dg = rand(5003, dtype=dtype) * 2, rand(5003, dtype=dtype)
    s[:3] = torch.tensor([1e-300 if dtype == torch.float64 else 1e-30, -0.0, 0.0])   # tiny positive: open
    assert torch.equal(C.binary_gate(s, ste, 0.7), reference.binary_gate(s, ste, 0.7))
    want = reference.binary_gate_backward(dg.double(), s.double(), ste, 0.7).to(dtype)
    torch.testing.assert_close(C.binary_gate_backward(dg, s, ste, 0.7), want, **tol(dtype))
    strided = s[::2]   # a strided view is read element by element, not linearly
    assert torch.equal(C.binary_gate(strided, ste, 0.7), reference.binary_gate(strided, ste, 0.7))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["zhuang", "bimodal"])
@pytest.mark.parametrize("n", [1, 67, 3001])
@pytest.mark.parametrize("kind", ["channels", "bilinear"])
def test_gpu_penalty_and_bank(C, dtype, form, n, kind):
    s = rand(n, dtype=dtype) * 2
    cm = (_bilinear_model(n, seed=n) if kind == "bilinear" and n > 1 else CostModel.channels(n)).to("cuda")
    args = cm.op_args("cuda")
    # float64 scores: the whole computation in float64 (costs included); otherwise float32 accumulation
    # (gradients are of size 1/n: atol scaled to them)
    t = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else tol(dtype, n, 1.0 / n)
    got = C.gate_penalty(s, *args, 1.1, 0.4, 3.0, 0.5, form, 1.05)
    want = reference.gate_penalty(s, *args, 1.1, 0.4, 3.0, 0.5, form, 1.05)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **t)
    got = C.gate_bank(s, "sigmoid", *args, 1.1, 0.4, form, 1.05)
    want = reference.gate_bank(s, "sigmoid", *args, 1.1, 0.4, form, 1.05)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, **t)
    dg, dt = rand(n, dtype=dtype), rand(4, dtype=got[1].dtype)
    torch.testing.assert_close(C.gate_bank_backward(dg, dt, s, got[2], got[3], "clipped", 1.1),
                               reference.gate_bank_backward(dg, dt, s, want[2], want[3], "clipped", 1.1), **t)
    if n > 2:   # strided scores
        v = s[::2]
        cv = CostModel.channels(v.numel()).to("cuda").op_args("cuda")
        for a, b in zip(C.gate_penalty(v, *cv, 1.1, 0.4, 3.0, 0.5, form, 1.05),
                        reference.gate_penalty(v, *cv, 1.1, 0.4, 3.0, 0.5, form, 1.05)):
            torch.testing.assert_close(a, b, **t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("c,hw", [(1, 1), (3, 49), (67, 49), (256, 3136), (67, 3136), (64, 56 * 56)])
def test_gpu_channel_gate(C, dtype, channels_last, c, hw):
    side = int(math.isqrt(hw))
    x = rand(3, c, side, hw // side, dtype=dtype, channels_last=channels_last)
    assert_channel_gate(C, x, binary(c, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_channel_gate_nan_in_a_closed_channel(C, dtype, channels_last):
    """A closed channel is x * 0: NaN and inf inputs give NaN there, as in the reference (DESIGN.md)."""
    x = rand(2, 8, 5, 5, dtype=dtype, channels_last=channels_last)
    g = torch.ones(8, device="cuda", dtype=dtype)
    g[[1, 6]] = 0
    x[0, 1, 2, 3], x[1, 6, 0, 0], x[1, 1, 4, 4] = math.nan, math.inf, -math.inf
    dy = rand(*x.shape, dtype=dtype)
    dy[0, 6, 1, 1] = math.nan
    assert_channel_gate(C, x, g, dy)
    y = C.channel_gate(x, g)
    assert y[0, 1, 2, 3].isnan() and y[1, 6, 0, 0].isnan() and y[1, 1, 4, 4].isnan()


@pytest.mark.parametrize("case", ["sliced", "sliced-spatial", "expanded", "transposed", "2d", "3d", "5d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_channel_gate_views(C, case, dtype):
    base = rand(4, 12, 9, 10, dtype=dtype)
    x = {"sliced": base[1:3, ::2], "sliced-spatial": base[:, ::2, 1:, ::3],
         "expanded": rand(1, 12, 1, 10, dtype=dtype).expand(4, 12, 9, 10),
         "transposed": base.transpose(2, 3), "2d": rand(37, 12, dtype=dtype), "3d": rand(5, 12, 33, dtype=dtype),
         "5d": rand(2, 12, 3, 4, 5, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)}[case]
    g = binary(x.shape[1], dtype)
    assert_channel_gate(C, x, g, dy=rand(*x.shape, dtype=dtype))


@pytest.mark.parametrize("shape,channels_last,dtype", [
    ((1, 64, 1024, 2048), True, torch.bfloat16),     # rows past 65535 blocks of the old (C, HW) grid
    ((1, 16, 3000, 3000), False, torch.float32),     # HW = 9 M: inner tiles past 65535
    ((70000, 3), False, torch.float32),              # 2-D (N, C) with N > 65535
    ((70000, 1), False, torch.float16),
    ((1, 8, 1 << 22), False, torch.float32),         # 2^25 elements: more than float32 counts exactly
], ids=["cl-1x64x1024x2048", "nchw-16x9M", "2d-70000x3", "2d-70000x1", "2^25"])
def test_gpu_channel_gate_past_grid_limits(C, shape, channels_last, dtype):
    x = rand(*shape, dtype=dtype, channels_last=channels_last)
    assert_channel_gate(C, x, binary(shape[1], dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_elementwise_past_2_24_and_grid(C, dtype):
    n = (1 << 25) + 3
    s = rand(n, dtype=dtype)
    assert torch.equal(C.binary_gate(s, "identity", 1.0), reference.binary_gate(s, "identity", 1.0))
    w, b, g = rand(n, dtype=dtype), rand(n, dtype=dtype), binary(n, dtype)
    for a, r in zip(C.gated_affine(w, b, g), reference.gated_affine(w, b, g)):
        assert torch.equal(a, r)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_gated_affine_and_opcheck(C, dtype, monkeypatch):
    w, b, g = rand(67, dtype=dtype), rand(67, dtype=dtype), binary(67, dtype)
    for a, r in zip(C.gated_affine(w, b, g), reference.gated_affine(w, b, g)):
        assert torch.equal(a, r)
    gw, gb = rand(67, dtype=dtype), rand(67, dtype=dtype)
    want = reference.gated_affine_backward(gw.double(), gb.double(), w.double(), b.double(), g.double())
    for a, r in zip(C.gated_affine_backward(gw, gb, w, b, g), want):
        torch.testing.assert_close(a, r.to(dtype), **tol(dtype, 2))
    monkeypatch.setenv("POLARPRUNE_BACKEND", C.name)
    backends._reset()
    x = rand(2, 5, 3, 7).requires_grad_()
    gate = (torch.rand(5, device="cuda") > 0.5).float().requires_grad_()
    torch.library.opcheck(pp.ops.ALL_OPS["channel_gate"], (x, gate))
    torch.library.opcheck(pp.ops.ALL_OPS["gate_bank"],
                          (rand(37).requires_grad_(), "identity", *_bilinear_model(37).op_args("cuda"),
                           1.0, 0.5, "bimodal", 1.0))
    backends._reset()


def _bits(t):
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
    return t.detach().contiguous().view(view) if t.is_floating_point() else t


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("op", ["binary_gate_backward", "gate_penalty", "gate_bank", "gate_bank_backward",
                                "gated_affine_backward", "channel_gate_backward bf16 NCHW",
                                "channel_gate_backward bf16 channels_last", "channel_gate_backward fp32 NCHW",
                                "channel_gate_backward fp32 channels_last"])
def test_gpu_reductions_are_deterministic(C, op):
    """Three runs on the same inputs, at sizes that fill the device: bitwise equal outputs."""
    n = (1 << 22) + 5
    s, dg = rand(n) * 2, rand(n)
    cm = _bilinear_model(n, seed=3).to("cuda")
    args = cm.op_args("cuda")
    if op.startswith("channel_gate_backward"):
        _, dname, layout = op.split()
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dname]
        x = rand(32, 256, 56, 56, dtype=dtype, channels_last=layout == "channels_last")
        dy = rand(32, 256, 56, 56, dtype=dtype, channels_last=layout == "channels_last")
        g = binary(256, dtype)
        fn = lambda: C.channel_gate_backward(dy, x, g)  # noqa: E731
    else:
        calls = {
            "binary_gate_backward": lambda: C.binary_gate_backward(dg, s, "sigmoid", 0.7),
            "gate_penalty": lambda: C.gate_penalty(s, *args, 1.0, 0.5, 2.0, 0.3, "bimodal", 0.8),
            "gate_bank": lambda: C.gate_bank(s, "sigmoid", *args, 1.0, 0.5, "zhuang", 0.8),
            "gate_bank_backward": lambda: C.gate_bank_backward(dg, rand(4), s, dg, s, "sigmoid", 1.0),
            "gated_affine_backward": lambda: C.gated_affine_backward(dg, s, s, dg, dg),
        }
        if op == "gate_bank_backward":
            dterms = rand(4)
            calls[op] = lambda: C.gate_bank_backward(dg, dterms, s, dg, s, "sigmoid", 1.0)
        fn = calls[op]
    first = [_bits(o).clone() for o in _tuple(fn())]
    for run in range(2):
        for i, o in enumerate(_tuple(fn())):
            assert torch.equal(_bits(o), first[i]), f"output {i} differs in run {run + 2}"
