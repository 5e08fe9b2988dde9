"""The providers the op tests run: the reference (pure PyTorch, the specification, on the CPU), Triton (on a GPU, or
on the CPU under Triton's interpreter) and the CUDA extension (on a GPU only).

* ``provider``: each of the three, skipped with the reason where it cannot run here;
* ``kernels``: Triton and the CUDA extension, the providers compared against the reference;
* ``triton_kernels``: Triton alone, for what only its kernels have (the grid-stride and split paths of
  ``kernels/_grids.py``).

A provider's backend is forced (POLARPRUNE_BACKEND) for the test, so the op layer (``pp.functional``,
``ops.ALL_OPS``) runs it too. The Triton and CUDA providers are marked ``gpu``: the GPU campaign (``pytest -m gpu``)
runs them on a GPU; the reference stays with CI.
"""
import os

import pytest
import torch

from polarprune_cuda.ops import backends

from helpers import NEEDS_GPU, PROVIDERS, Provider, poison_allocator, poison_empty

_NO_GPU = f"{NEEDS_GPU} (the CUDA extension's kernels take CUDA tensors only)"
# without a GPU the CUDA cases skip before any fixture runs (there are hundreds of them)
_KERNELS = [pytest.param("triton", marks=pytest.mark.gpu),
            pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                            reason=_NO_GPU)])]


def make_provider(name: str, monkeypatch) -> Provider:
    """The provider ``name`` for one test, or a skip saying why it cannot run here; outputs are poisoned first (the
    Triton wrappers' ``torch.empty``; on a GPU every freed block of the caching allocator), so an element a kernel
    leaves unwritten fails the comparison."""
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip(_NO_GPU)
    backend = backends.get_backend(PROVIDERS[name])
    if not backend.available:
        pytest.skip(f"the {name} backend is unavailable here: {backend.reason}")
    device = "cuda" if name != "reference" and torch.cuda.is_available() else "cpu"
    if name == "triton":
        poison_empty(monkeypatch)
    if device == "cuda" and os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") != "1":
        poison_allocator()
    monkeypatch.setenv("POLARPRUNE_BACKEND", PROVIDERS[name])
    backends._reset()
    return Provider(name, device, backend.ops)


@pytest.fixture(params=[pytest.param("reference"), *_KERNELS])
def provider(request, monkeypatch):
    return make_provider(request.param, monkeypatch)


@pytest.fixture(params=_KERNELS)
def kernels(request, monkeypatch):
    return make_provider(request.param, monkeypatch)


@pytest.fixture
def triton_kernels(monkeypatch):
    return make_provider("triton", monkeypatch)
