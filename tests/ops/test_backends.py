"""Backend registry: probing, forcing with POLARPRUNE_BACKEND, backend_info."""
import importlib
import os

import pytest
import torch

import polarprune_cuda as pp
from polarprune_cuda.ops import backends, reference

from helpers import randn


def test_backend_info_reports_every_backend_with_a_reason():
    info = pp.backend_info()
    assert set(info["backends"]) == {"cuda", "triton", "torch"}
    for name, entry in info["backends"].items():
        assert isinstance(entry["available"], bool)
        assert entry["reason"], name
        if entry["available"]:
            assert set(entry["ops"]) == set(backends.OPS)
    assert info["backends"]["torch"]["available"]
    assert info["selected"]["cpu"] == "torch"
    assert info["forced"] is None


def test_cpu_tensors_use_the_reference():
    name, fn = backends.select("channel_gate", "cpu")
    assert name == "torch" and fn is reference.channel_gate


def test_forcing_torch(monkeypatch):
    monkeypatch.setenv("POLARPRUNE_BACKEND", "torch")
    assert pp.backend_info()["forced"] == "torch"
    assert backends.select("gate_penalty", "cuda")[0] == "torch"
    s = randn(5)
    assert torch.equal(pp.functional.binary_gate(s), (s > 0).float())


def test_forcing_an_unknown_backend_names_the_variable(monkeypatch):
    monkeypatch.setenv("POLARPRUNE_BACKEND", "opencl")
    with pytest.raises(ValueError, match="POLARPRUNE_BACKEND must be one of cuda, triton, torch"):
        pp.functional.binary_gate(randn(3))


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_forcing_an_unavailable_backend_raises_with_the_reason(monkeypatch, name):
    monkeypatch.setitem(backends._PROBES, name, lambda: backends.Backend(name, False, "not on this machine"))
    monkeypatch.setenv("POLARPRUNE_BACKEND", name)
    with pytest.raises(pp.BackendUnavailableError, match=f"POLARPRUNE_BACKEND={name}.*not on this machine"):
        pp.functional.binary_gate(randn(3))
    assert "error" in pp.backend_info()["selected"]["cpu"]


def test_missing_extension_is_diagnosed_and_next_backend_used(monkeypatch):
    real = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name in ("polarprune_cuda._C", "polarprune_cuda.kernels"):
            raise ImportError(f"simulated: {name} missing")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(backends.importlib, "import_module", fake_import)
    info = pp.backend_info()
    assert not info["backends"]["cuda"]["available"]
    assert "simulated" in info["backends"]["cuda"]["reason"] or "not a CUDA build" in info["backends"]["cuda"]["reason"]
    assert not info["backends"]["triton"]["available"]
    assert info["selected"]["cuda"] == "torch"


def test_a_registered_backend_is_used_for_cuda_tensors(monkeypatch):
    calls = []

    def fake_gate(scores, ste, tau):
        calls.append(scores.shape)
        return reference.binary_gate(scores, ste, tau)

    ops = {name: getattr(reference, name) for name in backends.OPS} | {"binary_gate": fake_gate}
    monkeypatch.setitem(backends._PROBES, "triton", lambda: backends.Backend("triton", True, "fake", ops))
    monkeypatch.setitem(backends._PROBES, "cuda", lambda: backends.Backend("cuda", True, "fake ext", dict(ops)))
    assert backends.select("binary_gate", "cuda")[0] == "cuda"       # extension first
    backends._reset()
    monkeypatch.setitem(backends._PROBES, "cuda", lambda: backends.Backend("cuda", False, "not built"))
    assert backends.select("binary_gate", "cuda") == ("triton", fake_gate)   # then Triton
    assert backends.select("binary_gate", "cpu")[0] == "torch"
    monkeypatch.setenv("POLARPRUNE_BACKEND", "triton")
    # forced Triton takes CPU tensors only under the interpreter (the fake backend runs the reference anyway);
    # the conftest sets it only where there is no GPU, so it is set here, for this test, on every machine
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backends._reset()
    pp.functional.binary_gate(randn(4))
    assert calls == [torch.Size([4])]


def test_forced_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    ops = {name: getattr(reference, name) for name in backends.OPS}
    monkeypatch.setitem(backends._PROBES, "triton", lambda: backends.Backend("triton", True, "fake", ops))
    monkeypatch.setenv("POLARPRUNE_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(pp.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        pp.functional.binary_gate(randn(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_use_a_kernel_backend_when_one_is_available():
    info = pp.backend_info()
    expected = next((n for n in ("cuda", "triton") if info["backends"][n]["available"]), "torch")
    assert info["selected"]["cuda"] == expected
    s = randn(5).cuda()
    assert torch.equal(pp.functional.binary_gate(s).cpu(), (s.cpu() > 0).float())


def test_kernels_package_is_installed_under_the_package():
    kernels = importlib.import_module("polarprune_cuda.kernels")
    assert hasattr(kernels, "IMPLEMENTATIONS")


def test_the_interpreter_probe_names_the_versions_it_cannot_run():
    """kernels/_interpreter.py: triton 3.6's interpreter with numpy >= 2.4 cannot run a tensor-bounded loop; the
    Triton backend then says so (and why) instead of failing inside every kernel."""
    triton = pytest.importorskip("triton")
    import numpy

    from polarprune_cuda.kernels._interpreter import interpreter_problem

    def version(v):
        return tuple(int(p) for p in v.split(".")[:2])

    if torch.cuda.is_available():
        pytest.skip("with a GPU the kernels are compiled, not interpreted")
    assert os.environ.get("TRITON_INTERPRET") == "1"   # conftest.py sets it where there is no GPU
    problem = interpreter_problem()
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        assert problem and "numpy" in problem and triton.__version__ in problem
        assert not backends.get_backend("triton").available
    else:
        assert problem is None
