"""The Triton kernels compile for sm_90 ahead of time (no GPU needed; benchmarks/triton_aot.py) with the runtime's
specialisation of their real arguments: every kernel at the sizes where an integer argument equals 1 (the runtime
then passes it as a constexpr, which the interpreter never does), the channels_last bf16 channel_gate forward with
16-byte vector loads, and the penalty kernel with segment pairs without spilling in fp32."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")
ROOT = Path(__file__).resolve().parents[2]


#: the edge configurations (labels "edge ...") where an integer argument is 1, and the representative ones whose
#: loads, stores and spills are checked; compiled in one run of benchmarks/triton_aot.py for both tests
EDGE = r"n=1 |channel_gate \(1, 1, 1, 1\)|channel_gate \(16, 1\)|channel_gate \(1, 16\)"
REPRESENTATIVE = (r"^channel_gate fwd channels_last 8x64x56x56 torch.bfloat16|^gate_(penalty|bank) pairs, 53 segments"
                  r".*zhuang torch.float32")


@pytest.fixture(scope="module")
def records():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_aot.py"), "--json", "--set", "all",
                          "--only", f"^edge .*({EDGE})|{REPRESENTATIVE}"], capture_output=True, text=True, env=env,
                         timeout=240, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["failures"], "\n".join(f"{f['label']}: {f['error']}" for f in result["failures"])
    assert out.returncode == 0, out.stderr[-3000:]
    return result["records"]


def _aot(records, pattern, edge):
    """The records of the configurations matching ``pattern``, among the edge ones or the representative ones."""
    return [r for r in records if r["label"].startswith("edge ") == edge and re.search(pattern, r["label"])]


def test_every_kernel_compiles_where_an_integer_argument_is_1(records):
    """n == 1 made the penalty and gate-bank kernels fail to compile on a GPU (n.to() on a constexpr int)."""
    rows = _aot(records, EDGE, edge=True)
    kernels = {r["kernel"] for r in rows}
    wrappers = {name for name in ("binary_gate", "gate_bank", "gated_affine", "channel_gate", "gate_penalty")}
    assert {r["label"].split()[1] for r in rows} == wrappers
    assert kernels == {"_binary_gate_kernel", "_binary_gate_bwd_kernel", "_gate_bank_bwd_kernel", "_penalty_kernel",
                       "_gated_affine_kernel", "_gated_affine_bwd_kernel", "_channel_gate_kernel",
                       "_channel_gate_bwd_kernel"}, kernels
    assert any("gate_penalty n=1" in r["label"] and "float64" in r["label"] for r in rows)


def _widths(counts):
    return dict((k, int(v)) for k, v in (c.split(":") for c in counts.split()))


def test_aot_sm90_vector_loads_and_no_spills(records):
    rows = _aot(records, REPRESENTATIVE, edge=False)
    by_label = {r["label"]: r for r in rows}
    cg = by_label["channel_gate fwd channels_last 8x64x56x56 torch.bfloat16"]
    ld, st = _widths(cg["ld"]), _widths(cg["st"])
    assert ld["v4"] + ld["v2"] >= 1 and ld["s"] == 0, cg
    assert st["v4"] + st["v2"] >= 1 and st["s"] == 0, cg
    penalty = [r for r in rows if r["kernel"] == "_penalty_kernel"]
    assert len(penalty) == 2, rows  # gate_penalty and gate_bank (SPLIT)
    for r in penalty:
        assert r["spill_st"] == 0 and r["spill_ld"] == 0 and r["stack"] == 0, r
