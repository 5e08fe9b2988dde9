"""The CUDA extension: built from source where torch is a CUDA build and nvcc exists; kernels on a GPU."""
import json
import math
import shutil

import pytest
import torch

import polarprune_cuda as pp
from polarprune_cuda.ops import backends, reference
from polarprune_cuda.ops.cost import CostModel

from helpers import _bilinear_model, tol

CAN_BUILD = bool(torch.version.cuda) and shutil.which("nvcc") is not None
HAS_GPU = torch.cuda.is_available()


@pytest.mark.skipif(not CAN_BUILD, reason="needs a CUDA build of torch and nvcc to build the extension")
def test_extension_is_built_and_registers_a_cuda_kernel_for_every_op():
    import polarprune_cuda._C as ext

    for op in backends.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"polarprune_C::{op}", "CUDA"), op
    assert ext.cuda_runtime_version_built() // 1000 == int(torch.version.cuda.split(".")[0])
    info = pp.backend_info()["backends"]["cuda"]
    assert info["available"], info["reason"]
    assert "polarprune_cuda._C" in info["reason"] and set(info["ops"]) == set(backends.OPS)
    build = backends._build_info()
    assert build["cuda"] == torch.version.cuda and "9.0" in build["arch_list"]


@pytest.mark.skipif(not CAN_BUILD, reason="needs the extension")
def test_cuda_major_version_mismatch_is_diagnosed(monkeypatch):
    monkeypatch.setattr(backends, "_build_info", lambda: {"cuda": "11.8", "arch_list": "8.0"})
    backends._reset()
    info = pp.backend_info()
    assert not info["backends"]["cuda"]["available"]
    assert "built for CUDA 11.8" in info["backends"]["cuda"]["reason"]
    assert info["selected"]["cuda"] in ("triton", "torch")


def test_forcing_cuda_for_cpu_tensors_is_refused(monkeypatch):
    fake = backends.Backend("cuda", True, "fake", {op: None for op in backends.OPS})
    monkeypatch.setitem(backends._PROBES, "cuda", lambda: fake)
    monkeypatch.setenv("POLARPRUNE_BACKEND", "cuda")
    with pytest.raises(pp.BackendUnavailableError, match="CUDA tensors only"):
        pp.functional.binary_gate(torch.randn(3))


def test_find_cuda_home_follows_wrapper_scripts(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("setup_for_test", Path(__file__).resolve().parents[2] / "setup.py")
    source = spec.loader.get_data(spec.origin).decode()
    namespace = {"__file__": spec.origin}
    exec(compile(source.split("ext_modules, cmdclass = extension_setup()")[0], spec.origin, "exec"), namespace)
    toolkit = tmp_path / "cuda-99.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    (toolkit / "bin" / "nvcc").write_text("")
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    assert namespace["find_cuda_home"]() == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", "/opt/somewhere")
    assert namespace["find_cuda_home"]() == "/opt/somewhere"


# ------------------------------------------------------------------ on a GPU: the same suite as Triton's
gpu = pytest.mark.skipif(not HAS_GPU or not CAN_BUILD, reason="needs a CUDA GPU and the extension")
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


@pytest.fixture
def C():
    import polarprune_cuda._C  # noqa: F401

    poison_allocator()   # an output element a kernel leaves unwritten is NaN, and the comparison fails
    return torch.ops.polarprune_C


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


@gpu
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


@gpu
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


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("c,hw", [(1, 1), (3, 49), (67, 49), (256, 3136), (67, 3136), (64, 56 * 56)])
def test_gpu_channel_gate(C, dtype, channels_last, c, hw):
    side = int(math.isqrt(hw))
    x = rand(3, c, side, hw // side, dtype=dtype, channels_last=channels_last)
    assert_channel_gate(C, x, binary(c, dtype))


@gpu
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


@gpu
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


@gpu
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


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_elementwise_past_2_24_and_grid(C, dtype):
    n = (1 << 25) + 3
    s = rand(n, dtype=dtype)
    assert torch.equal(C.binary_gate(s, "identity", 1.0), reference.binary_gate(s, "identity", 1.0))
    w, b, g = rand(n, dtype=dtype), rand(n, dtype=dtype), binary(n, dtype)
    for a, r in zip(C.gated_affine(w, b, g), reference.gated_affine(w, b, g)):
        assert torch.equal(a, r)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_gated_affine_and_opcheck(C, dtype, monkeypatch):
    w, b, g = rand(67, dtype=dtype), rand(67, dtype=dtype), binary(67, dtype)
    for a, r in zip(C.gated_affine(w, b, g), reference.gated_affine(w, b, g)):
        assert torch.equal(a, r)
    gw, gb = rand(67, dtype=dtype), rand(67, dtype=dtype)
    want = reference.gated_affine_backward(gw.double(), gb.double(), w.double(), b.double(), g.double())
    for a, r in zip(C.gated_affine_backward(gw, gb, w, b, g), want):
        torch.testing.assert_close(a, r.to(dtype), **tol(dtype, 2))
    monkeypatch.setenv("POLARPRUNE_BACKEND", "cuda")
    backends._reset()
    x = rand(2, 5, 3, 7).requires_grad_()
    gate = (torch.rand(5, device="cuda") > 0.5).float().requires_grad_()
    torch.library.opcheck(pp.ops.ALL_OPS["channel_gate"], (x, gate))
    torch.library.opcheck(pp.ops.ALL_OPS["gate_bank"],
                          (rand(37).requires_grad_(), "identity", *_bilinear_model(37).op_args("cuda"),
                           1.0, 0.5, "bimodal", 1.0))
    backends._reset()


def test_build_info_is_json_when_present():
    info = backends._build_info()
    if info is not None:
        json.dumps(info)
        assert {"torch", "cuda", "arch_list"} <= set(info)
