"""The benchmark code runs (tiny sizes, no timing claims) so it cannot rot."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_benchmark_quick(tmp_path):
    result = _load("kernels").main(["--quick", "--out", str(tmp_path)])
    assert {"eager", "compile"} <= set(result["providers"])
    ops = {r["op"] for r in result["rows"]}
    assert {"copy", "channel_gate forward", "channel_gate backward", "bank gates + penalty forward"} <= ops
    assert all(r["us"] > 0 for r in result["rows"])
    assert len(list(tmp_path.glob("kernels-*.json"))) == 1


def test_pytest_benchmark_suite_runs_disabled():
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", "benchmarks/pytest.ini", "benchmarks",
                          "--benchmark-disable", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " passed" in out.stdout
