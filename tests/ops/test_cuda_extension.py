"""The CUDA extension: built from source where torch is a CUDA build and nvcc exists; kernels on a GPU."""
import json
import math
import shutil

import pytest
import torch

import polarprune_cuda as pp
from polarprune_cuda.ops import backends, reference
from polarprune_cuda.ops.cost import CostModel

from helpers import _bilinear_model

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
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float64: dict(rtol=1e-9, atol=1e-9)}


@pytest.fixture
def C():
    import polarprune_cuda._C  # noqa: F401

    # poison the caching allocator: freed blocks hold NaN, so unwritten outputs fail
    for _ in range(4):
        torch.full((1 << 22,), math.nan, device="cuda")
    return torch.ops.polarprune_C


def rand(*shape, dtype=torch.float32, channels_last=False):
    t = torch.randn(*shape, device="cuda", dtype=torch.float64).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("ste", ["identity", "clipped", "sigmoid"])
def test_gpu_gate_kernels(C, dtype, ste):
    s, dg = rand(5003, dtype=dtype) * 2, rand(5003, dtype=dtype)
    assert torch.equal(C.binary_gate(s, ste, 0.7), reference.binary_gate(s, ste, 0.7))
    torch.testing.assert_close(C.binary_gate_backward(dg, s, ste, 0.7),
                               reference.binary_gate_backward(dg, s, ste, 0.7), **TOL[dtype])


@gpu
@pytest.mark.parametrize("form", ["zhuang", "bimodal"])
@pytest.mark.parametrize("n", [1, 67, 3001])
@pytest.mark.parametrize("kind", ["channels", "bilinear"])
def test_gpu_penalty_and_bank(C, form, n, kind):
    s = rand(n) * 2
    cm = (_bilinear_model(n, seed=n) if kind == "bilinear" and n > 1 else CostModel.channels(n)).to("cuda")
    args = cm.op_args("cuda")
    got = C.gate_penalty(s, *args, 1.1, 0.4, 3.0, 0.5, form, 1.05)
    want = reference.gate_penalty(s, *args, 1.1, 0.4, 3.0, 0.5, form, 1.05)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    got = C.gate_bank(s, "sigmoid", *args, 1.1, 0.4, form, 1.05)
    want = reference.gate_bank(s, "sigmoid", *args, 1.1, 0.4, form, 1.05)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    dg, dt = rand(n), rand(4)
    torch.testing.assert_close(C.gate_bank_backward(dg, dt, s, got[2], got[3], "clipped", 1.1),
                               reference.gate_bank_backward(dg, dt, s, want[2], want[3], "clipped", 1.1))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("c,hw", [(1, 1), (3, 49), (67, 49), (256, 3136), (67, 3136)])
def test_gpu_channel_gate(C, dtype, channels_last, c, hw):
    side = int(math.isqrt(hw))
    x = rand(3, c, side, hw // side, dtype=dtype, channels_last=channels_last)
    g = (torch.rand(c, device="cuda") > 0.5).to(dtype)
    y = C.channel_gate(x, g)
    assert torch.equal(y, reference.channel_gate(x, g)) and y.stride() == x.stride()
    dy = rand(*x.shape, dtype=dtype)
    dx, dgate = C.channel_gate_backward(dy, x, g)
    dx_ref, dg_ref = reference.channel_gate_backward(dy, x, g)
    assert torch.equal(dx, dx_ref)
    torch.testing.assert_close(dgate, dg_ref, **TOL[dtype])
    assert torch.equal(dgate, C.channel_gate_backward(dy, x, g)[1])   # deterministic


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_gated_affine_and_opcheck(C, dtype, monkeypatch):
    w, b, g = rand(67, dtype=dtype), rand(67, dtype=dtype), (torch.rand(67, device="cuda") > 0.5).to(dtype)
    for a, r in zip(C.gated_affine(w, b, g), reference.gated_affine(w, b, g)):
        assert torch.equal(a, r)
    gw, gb = rand(67, dtype=dtype), rand(67, dtype=dtype)
    for a, r in zip(C.gated_affine_backward(gw, gb, w, b, g), reference.gated_affine_backward(gw, gb, w, b, g)):
        torch.testing.assert_close(a, r, **TOL[dtype])
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
