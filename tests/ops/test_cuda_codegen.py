"""What the CUDA kernels compile to for sm_90 (benchmarks/cuda_sass.py: ptxas -v and the SASS), checked
without a GPU: 16-byte loads and stores in the vector paths of channel_gate, no spills, and the penalty
kernel within the 64 registers a 1024-thread block allows."""
import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CAN_BUILD = bool(torch.version.cuda) and shutil.which("nvcc") is not None
pytestmark = pytest.mark.skipif(not CAN_BUILD, reason="needs nvcc and a CUDA build of torch")


@pytest.fixture(scope="module")
def rows():
    """The sm_90 code of the built extension (make test builds it with 9.0 in its arch list), else csrc/
    compiled here for sm_90 (about 40 s on 2 cores)."""
    pytest.importorskip("triton", reason="cuobjdump comes with Triton's package")
    spec = importlib.util.spec_from_file_location("cuda_sass", ROOT / "benchmarks" / "cuda_sass.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        import polarprune_cuda._C as ext
    except ImportError:
        ext = None
    if ext is not None:
        built = [r for r in mod.report_binary(Path(ext.__file__), "90")
                 if r["file"] in ("channel_gate.cu", "gate_penalty.cu")]
        if built:
            return built
    return mod.report(ROOT / "csrc", "90", ("channel_gate.cu", "gate_penalty.cu"))


def _vec(kernel):
    """The VEC template argument, from the demangled name (or the mangled one where c++filt is missing)."""
    m = re.search(r", (\d+)>$", kernel) or re.search(r"Li(\d+)EEEv", kernel)
    return int(m[1])


def test_channel_gate_vector_paths_use_16_byte_accesses(rows):
    gate = [r for r in rows if r["file"] == "channel_gate.cu"]
    assert len(gate) == 32   # fwd (2 layouts) + bwd (2 kernels), 4 dtypes, vector and scalar paths
    for r in gate:
        assert r["spill"] == 0 and r["regs"] <= 64, r
        if _vec(r["kernel"]) > 1:
            assert r["ldg"].get("128", 0) >= 1 and r["stg"].get("128", 0) >= 1, r
        channels_last_fwd = "channel_gate_fwd" in r["kernel"] and ("true" in r["kernel"] or "Lb1E" in r["kernel"])
        if channels_last_fwd and _vec(r["kernel"]) > 1:
            assert set(r["ldg"]) == {"128"}, r   # channels_last forward: x and g as vectors, nothing masked


def test_penalty_kernel_fits_1024_threads(rows):
    pen = [r for r in rows if r["file"] == "gate_penalty.cu"]
    assert len(pen) == 4
    for r in pen:
        assert r["regs"] <= 64 and r["spill"] == 0, r
