"""The CUDA extension: built from source where torch is a CUDA build and nvcc exists, diagnosed where not.

Its kernels, on a GPU, are tested op by op (the CUDA provider of tests/ops/test_<op>.py), with Triton's beside them."""
import json
import shutil

import pytest
import torch

import polarprune_cuda as pp
from polarprune_cuda.ops import backends


CAN_BUILD = bool(torch.version.cuda) and shutil.which("nvcc") is not None


@pytest.mark.gpu
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
def test_build_info_is_json_when_present():
    info = backends._build_info()
    if info is not None:
        json.dumps(info)
        assert {"torch", "cuda", "arch_list"} <= set(info)
