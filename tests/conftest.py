import os

import torch

# Triton kernels run on CPU tensors through Triton's interpreter; it must be on
# before polarprune_cuda.kernels is imported. On a CUDA machine they run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import polarprune_cuda as pp  # noqa: E402,F401  (imported once, with the interpreter set, before any test)
from polarprune_cuda.ops import backends  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_clean_backend(monkeypatch, tmp_path_factory):
    """Fresh seed per test; no backend forced unless a test says so; latency tables cached in the test's
    temporary folders, never in the user's."""
    torch.manual_seed(1234)
    # the report's latency measures until its rounds agree or 10 s are spent: in the suite, tiny models on a busy
    # machine, at most 1 s (tests/test_cli.py checks the rule itself with explicit limits)
    from polarprune_cuda.train import report

    monkeypatch.setattr(report, "MAX_SECONDS", 1.0)
    monkeypatch.setenv("POLARPRUNE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "polarprune-cache"))
    if "POLARPRUNE_BACKEND" in os.environ:
        monkeypatch.delenv("POLARPRUNE_BACKEND")
    backends._reset()
    yield
    backends._reset()


@pytest.fixture
def run_copy(finished, tmp_path):
    """A copy of the test module's own ``finished`` run folder (each module that uses this defines one)."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


def pytest_addoption(parser):
    parser.addoption("--zoo", action="store_true",
                     help="run the whole model zoo (tests marked zoo; `make zoo`), not only its quick list")


def pytest_configure(config):
    config.addinivalue_line("markers", "zoo: the whole model zoo (slow): selected by --zoo, `make zoo`")
    config.addinivalue_line("markers", "gpu: what the GPU campaign runs on a GPU (pytest -m gpu, benchmarks/gpu_first.sh); "
                                       "CPU-only tests stay with CI")


def pytest_collection_modifyitems(config, items):
    """Without --zoo the whole-zoo tests are deselected (not skipped): `make test` runs the quick list."""
    if config.getoption("--zoo"):
        return
    whole = [item for item in items if item.get_closest_marker("zoo") is not None]
    if whole:
        config.hook.pytest_deselected(items=whole)
        items[:] = [item for item in items if item.get_closest_marker("zoo") is None]
