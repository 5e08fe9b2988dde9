"""The Triton kernels compile for sm_90 ahead of time (no GPU needed; benchmarks/triton_aot.py): the channels_last
bf16 channel_gate forward loads with 16-byte vectors, and the penalty kernel with segment pairs compiles (the
interpreter runs code a GPU compile rejects) without spilling in fp32."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")
ROOT = Path(__file__).resolve().parents[2]


def _aot(pattern):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_aot.py"), "--json", "--only", pattern],
                         capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _widths(counts):
    return dict((k, int(v)) for k, v in (c.split(":") for c in counts.split()))


def test_aot_sm90_vector_loads_and_no_spills():
    rows = _aot(r"^channel_gate fwd channels_last 8x64x56x56 torch.bfloat16|^gate_(penalty|bank) pairs, 53 segments"
                r".*zhuang torch.float32")
    by_label = {r["label"]: r for r in rows}
    cg = by_label["channel_gate fwd channels_last 8x64x56x56 torch.bfloat16"]
    ld, st = _widths(cg["ld"]), _widths(cg["st"])
    assert ld["v4"] + ld["v2"] >= 1 and ld["s"] == 0, cg
    assert st["v4"] + st["v2"] >= 1 and st["s"] == 0, cg
    penalty = [r for r in rows if r["kernel"] == "_penalty_kernel"]
    assert len(penalty) == 2, rows  # gate_penalty and gate_bank (SPLIT)
    for r in penalty:
        assert r["spill_st"] == 0 and r["spill_ld"] == 0 and r["stack"] == 0, r
