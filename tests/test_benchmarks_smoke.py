"""The benchmark code runs (tiny sizes, no timing claims) so it cannot rot."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import polarprune_cuda as pp

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{Path(name).name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


common = _load("micro/common")


def test_pytest_benchmark_suites_run_disabled():
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", "benchmarks/micro/pytest.ini", "benchmarks/micro",
                          "--benchmark-disable", "--tiny", "-p", "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    passed = int(out.stdout.strip().splitlines()[-1].split(" passed")[0].split()[-1])
    assert passed >= 40, out.stdout    # kernels x providers, training x variants, inference x variants


def test_make_bench_pipeline_tiny(tmp_path):
    """run.py end to end on tiny shapes: suites, JSON, Markdown, PNG, and the README block."""
    readme = tmp_path / "README.md"
    readme.write_text("intro\n\n<!-- bench-table:start -->\nstale table\n<!-- bench-table:end -->\n\noutro\n")
    path = _load("run").main(["--out", str(tmp_path / "res"), "--readme", str(readme), "--keep-raw", "--", "--tiny"])
    res = json.loads(path.read_text())
    assert res["tiny"] and res["device_type"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert res["failed"] == []
    assert path.name.startswith(common.device_slug(res["device"]))
    for model in common.MODELS:
        train = res["training"][model]
        assert set(train) == {"unpruned", "naive", "polarprune"}
        assert train["unpruned"]["vs_unpruned"] == 1.0 and train["polarprune"]["median_ms"] > 0
        inf = res["inference"][model]
        assert set(inf) == {"unpruned", "extracted-30", "extracted-50", "extracted-70"}
        removed = [inf[f"extracted-{p}"]["macs_removed"] for p in (30, 50, 70)]
        assert removed == sorted(removed) and 0.15 < removed[0] and removed[-1] < 0.9
        assert inf["extracted-70"]["macs"] < inf["unpruned"]["macs"]
        assert inf["unpruned"]["speedup"] == 1.0
    assert {r["provider"] for r in res["kernels"]} >= {"eager", "compile"}
    if not res["energy"]["available"]:
        assert res["energy"]["reason"]
    for ext in (".md", ".png"):
        assert path.with_suffix(ext).stat().st_size > 0
    assert (path.parent / f"{path.stem}-raw.json").is_file()
    text = readme.read_text()
    assert "stale table" not in text and text.startswith("intro") and text.rstrip().endswith("outro")
    assert "Training step" in text and "extracted-50" in text and path.stem in text

    again = _load("run").main(["--from-json", str(path.parent / f"{path.stem}-raw.json"), "--out",
                               str(tmp_path / "again"), "--no-readme"])
    assert json.loads(again.read_text())["inference"] == res["inference"]


def test_run_refuses_foreign_json(tmp_path):
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps({"machine_info": {}, "benchmarks": []}))
    with pytest.raises(ValueError, match="polarprune machine info"):
        _load("run").main(["--from-json", str(raw), "--out", str(tmp_path), "--no-readme"])
    with pytest.raises(SystemExit, match="no such file"):
        _load("run").main(["--from-json", str(tmp_path / "missing.json"), "--no-readme"])


_SUITE = {
    "test_ok.py": "def test_ok(benchmark):\n    benchmark(lambda: None)\n",
    "test_bad.py": "def test_bad(benchmark):\n    benchmark(lambda: None)\n    assert False, 'boom'\n",
    "test_broken.py": "import pytest\n\n\n@pytest.fixture\ndef broken():\n    raise RuntimeError('no fixture')\n\n\n"
                      "def test_broken(broken):\n    pass\n",
}


def _suite(folder):
    folder.mkdir()
    for name, text in _SUITE.items():
        (folder / name).write_text(text)
    (folder / "pytest.ini").write_text("[pytest]\n")
    return folder


def test_run_suites_returns_the_failed_tests_and_summarises_the_rest(tmp_path):
    run = _load("run")
    raw = tmp_path / "raw.json"
    failed = run.run_suites(raw, [], _suite(tmp_path / "suite"))
    by_test = {f["test"].split("::")[-1]: f for f in failed}
    assert set(by_test) == {"test_bad", "test_broken"}
    assert by_test["test_bad"]["outcome"] == "failed" and "boom" in by_test["test_bad"]["reason"]
    assert by_test["test_broken"]["outcome"] == "error"
    data = json.loads(raw.read_text())
    assert any(b["name"] == "test_ok" for b in data["benchmarks"])     # what finished is kept
    data["machine_info"]["polarprune"] = run.machine_info(["--tiny"])
    res = run.summarise(data, "cmd", failed)
    assert res["failed"] == failed and res["training"] == {}
    md = run.markdown(res, "x")
    assert "## Failed" in md and "test_bad" in md and "test_broken" in md
    with pytest.raises(ValueError, match="no benchmark"):       # nothing ran and nothing failed: refused as before
        run.summarise({"machine_info": data["machine_info"], "benchmarks": []}, "cmd", [])


def test_run_main_writes_results_when_benchmarks_fail(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench-table:start -->\nold\n<!-- bench-table:end -->\n")
    path = _load("run").main(["--suites", str(_suite(tmp_path / "suite")), "--out", str(tmp_path / "res"),
                              "--readme", str(readme)])
    res = json.loads(path.read_text())
    assert {f["test"].split("::")[-1] for f in res["failed"]} == {"test_bad", "test_broken"}
    assert "test_bad" in path.with_suffix(".md").read_text() and "test_bad" in readme.read_text()
    # a run that breaks before any benchmark (no test collected): still a result, the failure named
    empty = tmp_path / "empty"
    empty.mkdir()
    path = _load("run").main(["--suites", str(empty), "--out", str(tmp_path / "res2"), "--no-readme"])
    res = json.loads(path.read_text())
    assert res["failed"][0]["test"] == "<pytest>" and "exit code 5" in res["failed"][0]["reason"]


def test_run_parse_failed():
    out = "x\nFAILED a.py::t[1] - AssertionError: no\nERROR b.py::u\nFAILED a.py::t[1] - AssertionError: no\n"
    assert _load("run").parse_failed(out) == [
        {"test": "a.py::t[1]", "outcome": "failed", "reason": "AssertionError: no"},
        {"test": "b.py::u", "outcome": "error", "reason": ""}]


campaign = _load("campaign")


def _script() -> str:
    return (ROOT / "benchmarks" / "gpu_first.sh").read_text()


def _var(script: str, name: str) -> str:
    return re.search(rf'^{name}="([^"]*)"', script, re.M).group(1)


def _step_limits(script: str, name: str = "LIMITS") -> dict:
    return {k: int(v) for k, v in (kv.split("=") for kv in _var(script, name).split())}


def test_gpu_first_script_parses_and_fits_one_device_command():
    script = _script()
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_first.sh")]).returncode == 0
    limits = _step_limits(script)
    assert sum(limits.values()) <= 480, limits                 # 8 minutes, the device command's budget
    assert int(re.search(r"^DEADLINE=(\d+)", script, re.M).group(1)) <= 480
    assert set(limits) == {"facts", "wheels", "build", "tests", "bench", "sanitizer", "summary"}
    dry = _step_limits(script, "DRY_LIMITS")
    assert set(dry) == {"facts", "wheels", "build", "aot", "tests", "summary"}
    for name in set(limits) | set(dry):                        # every declared step runs through `step`
        if name != "wheels":
            assert re.search(rf"^\s*step {name} ", script, re.M), name
    assert "timeout -k" in script and "POLARPRUNE_PTXAS_VERBOSE=1" in script and "POLARPRUNE_REQUIRE_EXT=1" in script
    # the files it leaves in OUT: at most 8 (the device tool brings back 8)
    outs = set(re.findall(r'\$out/([A-Za-z0-9_.-]+)', script)) | {"summary.md"}
    assert {"aot.json", "bench.json", "tests.xml", "sanitizer.txt"} <= outs
    assert len(outs - {"aot.json"}) <= 8, outs                             # on the GPU
    assert len(outs - {"bench.json", "bench.txt", "sanitizer.txt"}) <= 8   # the dry run


def test_gpu_first_fixes_of_the_dry_run():
    """What the dry run on the GPU image's versions found, each checked in the script (issue: the campaign must
    work the first time)."""
    script = _script()
    # the build fetches nothing and builds with the environment's setuptools (pyproject.toml)
    assert "pip install -v --no-index --no-build-isolation --no-deps -e ." in script
    assert (ROOT / "pyproject.toml").is_file()
    # the facts say which pip, setuptools, wheel and ninja built it
    for word in ('echo "pip ', 'print("setuptools"', 'echo "ninja '):
        assert word in script, word
    # the GPU tests: only the gpu-marked ones, in parallel, each under a timeout, junit XML; CPU-only files stay
    # with CI
    tests = re.search(r"^\s*step tests [^\n]*-m gpu(?:[^\n]*\\\n)*[^\n]*", script, re.M).group(0)
    assert "$(workers_opt" in tests and "$(timeout_opt" in tests and "--junitxml" in tests
    # the sanitizer sees small overruns only with the caching allocator off
    san = re.search(r"^\s*step sanitizer (?:[^\n]*\\\n)*[^\n]*", script, re.M).group(0)
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in san and "compute-sanitizer --tool memcheck" in san
    # the benchmarks in the order of the goals: training step, bank, kernels; torch.compile only for the goal
    nodes = _var(script, "BENCH_NODES").split()
    assert [n.split("/")[-1].split(".py")[0] for n in nodes] == ["bench_training", "bench_gate_bank", "bench_kernels"]
    assert _var(script, "BENCH_K") == "not compile or (channel_gate and backward)"
    assert "--benchmark-json" in script and "gpu_checks" not in script
    # every pytest step ends itself before its limit (summary line and junit XML written): --session-timeout
    assert script.count("$(session_opt") == 4


def _bench_function(script: str) -> str:
    """The script's bench() function, as its text."""
    return re.search(r"^    bench\(\) \{\n.*?^    \}\n", script, re.M | re.S).group(0)


def test_the_campaign_bench_step_collects_what_the_goals_read(tmp_path):
    """The bench step's own function (one pytest run per suite, each merged into bench.json as it ends), run tiny
    on this machine: it yields the rows campaign.py reads (the interleaved ResNet-50 step, the bank per
    direction, channel_gate backward beside a copy of its bytes and torch.compile), torch.compile for that goal
    only, and the summary reads them."""
    script = _script()
    limits = _var(script, "BENCH_LIMITS").split()
    assert len(limits) == len(_var(script, "BENCH_NODES").split()) == 3
    assert sum(map(int, limits)) <= _step_limits(script)["bench"]
    helpers = [re.search(rf"^{name}\(\) \{{.*?\}}$", script, re.M | re.S).group(0)
               for name in ("has", "timeout_opt", "session_opt")]
    program = "set -uo pipefail\n" + "\n".join(helpers) + "\n" + _bench_function(script) + "bench\n"
    env = os.environ | {"py": sys.executable, "out": str(tmp_path), "BENCH_K": _var(script, "BENCH_K"),
                        "BENCH_NODES": _var(script, "BENCH_NODES"), "BENCH_LIMITS": "300 300 300",
                        "BENCH_OPTS": "--tiny --rounds 1 --energy-seconds 0"}
    for old in Path("/tmp").glob("polarprune-bench-*.json"):
        old.unlink()
    out = subprocess.run(["bash", "-c", program], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = campaign.bench_rows(tmp_path / "bench.json")
    kinds = {r["kind"] for r in rows}
    assert kinds == {"training-interleaved", "bank", "kernel"}, kinds
    compiled = {(r["op"], r["pass_"]) for r in rows if r.get("provider") == "compile"}
    assert compiled == {("channel_gate", "backward")}
    cg = {r["provider"] for r in rows if r.get("op") == "channel_gate" and r.get("pass_") == "backward"}
    assert {"eager", "compile", "copy"} <= cg
    assert all(r["floor_bytes"] > 0 and r["wall_us"] > 0 for r in rows if r["kind"] == "kernel")
    assert {(r["backend"], r["direction"]) for r in rows if r["kind"] == "bank"} == {("torch", "forward"),
                                                                                  ("torch", "backward")}
    text = campaign.main([str(tmp_path)])
    assert "ResNet-50 training step (float32, batch 2" in text and "gate bank + MACs penalty (torch)" in text
    assert "channel_gate backward (ResNet-50 activations, bf16): **not measured** (no CUDA or Triton row)" in text


def test_campaign_merge_keeps_every_readable_part(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"machine_info": {"m": 1}, "benchmarks": [{"name": "x"}]}))
    b.write_text(json.dumps({"machine_info": {"m": 2}, "benchmarks": [{"name": "y"}, {"name": "z"}]}))
    merged = campaign.main(["--merge", str(tmp_path / "bench.json"), str(a), str(tmp_path / "cut.json"), str(b)])
    assert [x["name"] for x in merged["benchmarks"]] == ["x", "y", "z"] and merged["machine_info"] == {"m": 1}
    assert json.loads((tmp_path / "bench.json").read_text()) == merged


def _bench(rows):
    return {"benchmarks": [{"name": f"b{i}", "stats": {"median": r.pop("median_s", 1e-3)}, "extra_info": r}
                           for i, r in enumerate(rows)]}


def _junit(cases):
    body = "".join(f'<testcase classname="tests.ops.test_channel_gate" name="{n}">{inner}</testcase>' for n, inner in cases)
    return f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>'


def test_campaign_summary_states_every_goal(tmp_path):
    """Goals met, NOT met and not measured from synthetic files; the verdicts are pytest's summary lines, never a
    progress line; a sanitizer run in which no case ran says so instead of '0 errors'."""
    case = "(256, 256, 56, 56) bfloat16 channels_last"
    kern = lambda provider, gpu: dict(kind="kernel", op="channel_gate", pass_="backward", provider=provider,  # noqa
                                      case=case, floor_bytes=3 * 2 * 256 * 256 * 56 * 56, gpu_us=gpu,
                                      calls_per_round=20, wall_us=gpu + 3)
    rows = [kern("cuda", 400.0), kern("triton", 430.0), kern("compile", 520.0), kern("copy", 350.0),
            dict(kind="bank", backend="cuda", direction="forward", gpu_us=11.0, wall_us=25.0, calls_per_round=20),
            dict(kind="bank", backend="cuda", direction="backward", gpu_us=19.0, wall_us=30.0, calls_per_round=20),
            dict(kind="training-interleaved", model="resnet50",
                 setting={"dtype": "bfloat16", "batch": 256, "channels_last": True},
                 variants={"unpruned": {"median_ms": 200.0}, "naive": {"median_ms": 230.0},
                           "polarprune": {"median_ms": 203.0}})]
    (tmp_path / "bench.json").write_text(json.dumps(_bench(rows)))
    (tmp_path / "campaign.log").write_text("STEP facts status=ok seconds=3 limit=15\n"
                                           "STEP tests status=timeout seconds=110 limit=110\n")
    (tmp_path / "tests.txt").write_text("tests/ops/test_channel_gate.py ....F...  [ 40%]\n"
                                        "=== 1 failed, 300 passed, 2 skipped in 98.1s ===\n")
    (tmp_path / "tests.xml").write_text(_junit([("test_a[cuda]", ""), ("test_b[triton]",
                                                '<failure message="AssertionError: NaN at 3">x</failure>')]))
    (tmp_path / "sanitizer.txt").write_text("======== ERROR SUMMARY: 0 errors\n"
                                            "===== no tests ran in 0.5s =====\n")
    (tmp_path / "build.log").write_text("ptxas info    : Used 40 registers\nptxas info    : Used 64 registers\n"
                                        "0 bytes spill stores, 0 bytes spill loads\n")
    text = campaign.main([str(tmp_path)])
    assert "best cuda 400.0 us = 88% of a copy" in text and "goal >= 85%: met" in text
    assert "1.30x torch.compile's 520.0 us (goal >= 1.25x: met)" in text
    assert "forward 11.0 us, backward 19.0 us GPU time (goal <= 15 us per direction: **NOT met**)" in text
    assert "= 1.015x (goal <= 1.02x: met); naive gating 1.150x" in text
    assert "1 failed, 300 passed, 2 skipped in 98.1s" in text and "NaN at 3" in text and "[ 40%]" not in text
    assert "| tests | timeout | 110 | 110 |" in text
    assert "**no case ran**" in text and "registers max 64" in text
    # cut runs: no summary line is said as such, a missing file as not run
    (tmp_path / "tests.txt").write_text("tests/ops/test_channel_gate.py ....  [ 10%]\n")
    (tmp_path / "tests.xml").unlink()
    (tmp_path / "sanitizer.txt").write_text("========= ERROR SUMMARY: 0 errors\n=== 24 passed in 40.2s ===\n")
    (tmp_path / "bench.json").unlink()
    text = campaign.main([str(tmp_path)])
    assert "**no pytest summary line** (cut or crashed: see tests.txt)" in text
    assert "0 errors over 24 test cases that ran" in text
    assert text.count("**not measured**") >= 3


def test_pytest_verdict_is_the_summary_line():
    assert campaign.pytest_verdict("a.py ..F [ 50%]\n= 1 failed, 2 passed in 3.0s =\n") == "1 failed, 2 passed in 3.0s"
    assert campaign.pytest_verdict("a.py .. [100%]\n") is None
    assert campaign.verdict_counts("1 failed, 20 passed, 3 errors in 2s") == {"failed": 1, "passed": 20, "error": 3}


def test_l2_flush_reads_and_never_writes_its_buffer():
    f = common.L2Flush(torch.device("cpu"))
    assert f.buffer is None                                    # a CPU has no flush to do
    f.buffer = torch.randn(10_000)                             # the GPU path on a CPU tensor
    before = f.buffer.clone()
    f()
    assert torch.equal(f.buffer, before)                       # no dirty lines: nothing written back later
    assert f.out.item() == pytest.approx(before.sum().item(), rel=1e-5)


def test_round_timer_times_rounds_of_calls():
    calls = []
    t = common.RoundTimer(lambda: calls.append(1), 5, torch.device("cpu"))
    for _ in range(4):
        t()
    info = t.info(skip=1)
    assert len(calls) == 20 and info["calls_per_round"] == 5 and info["wall_us"] > 0 and info["gpu_us"] is None


def test_gpu_first_without_a_gpu_stops_after_the_facts(tmp_path):
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_first.sh"), str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    log = (tmp_path / "out" / "campaign.log").read_text()
    assert "STEP facts status=exit-3" in log and "no CUDA device" in log and "STEP summary status=ok" in log
    assert "STEP build" not in log
    assert re.search(r"^pip \S+ \d", log, re.M) and re.search(r"^setuptools \d", log, re.M), log
    assert "**not measured**" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_seeded_gate_rule_hits_the_macs_target(target):
    setting = common.Setting("resnet56", 2, 32, "float32", False, 2)
    small, dense, counts = common.extracted(setting, target)
    assert abs(1 - counts["macs"] / dense["macs"] - target) < 0.05
    small2, _, counts2 = common.extracted(setting, target)
    assert counts2 == counts     # seeded: the same model every run
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), small2.state_dict().values()))
    with pytest.raises(ValueError, match="macs_removed"):
        common.close_for_macs(pp.attach_gates(pp.resnet20(), torch.randn(1, 3, 32, 32)), 1.0)


def test_naive_and_polarprune_gating_compute_the_same_function():
    """The training-step comparison is fair: with the same gates closed both gated models are the same function."""
    import copy

    torch.manual_seed(0)
    plain = common.build("resnet56").eval()
    with torch.no_grad():        # non-trivial BN statistics so closing a channel changes the output
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.bias.normal_()
    x = torch.randn(2, 3, 32, 32)
    naive = common.naive_gated(copy.deepcopy(plain)).eval()
    ours = pp.attach_gates(copy.deepcopy(plain), x[:1]).eval()
    torch.testing.assert_close(naive(x), plain(x))
    torch.testing.assert_close(ours(x), plain(x))
    bank = pp.find_bank(ours)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for index, rec in enumerate(bank.surgery.groups):
            closed = torch.randperm(bank.sizes[index], generator=g)[: bank.sizes[index] // 3]
            bank.scores[bank.offsets[index] + closed] = -1.0
            for name in rec.gated:          # every BN gated by this group: its naive gate closes the same channels
                naive.get_submodule(name + ".1").scores[closed] = -1.0
    out = ours(x)
    assert not torch.allclose(out, plain(x), atol=1e-3)
    torch.testing.assert_close(naive(x), out, rtol=1e-5, atol=1e-5)


def test_training_step_variants_update_every_parameter():
    setting = common.settings(torch.device("cpu"), tiny=True)["resnet56"]
    for variant in ("unpruned", "naive", "polarprune"):
        step, model = common.training_step(variant, setting, torch.device("cpu"))
        before = [p.detach().clone() for p in model.parameters()]
        step()
        changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert changed >= len(before) - 2, variant     # weights, BN affines and gate scores all get updates
    with pytest.raises(ValueError, match="variant"):
        common.training_step("other", setting, torch.device("cpu"))


def test_fggp_comparison_tiny(tmp_path):
    """The FGGP vs GMP vs annealed comparison runs, writes its table, and reuses finished runs."""
    args = ["--preset", "quick", "--models", "resnet20", "--sparsities", "0.9", "--epochs", "2",
            "--max-train", "256", "--quiet", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "res")]
    res = _load("experiments/fggp_compare").main(args)
    assert res["settings"] == 1 and set(res["table"][0]["best"]) <= {"fggp", "gmp", "annealed"}
    assert set(res["table"][0]["mean_accuracy"]) == {"fggp", "gmp", "annealed"}
    runs = [r for r in res["runs"] if r["method"] != "dense"]
    assert len(runs) == 3 and all(abs(r["sparsity"] - 0.9) < 1e-3 for r in runs)
    md = next((tmp_path / "res").glob("fggp-digits-*.md")).read_text()
    assert "FGGP ranks first alone in" in md and "resnet20" in md
    again = _load("experiments/fggp_compare").main(args)      # every run is read back, not repeated
    assert again["runs"] == res["runs"]
    with pytest.raises(SystemExit, match="sparsities"):
        _load("experiments/fggp_compare").main(args[:4] + ["--sparsities", "1.2"])


def test_blocks_comparison_runs_and_reuses_finished_runs(tmp_path):
    args = ["--preset", "quick", "--epochs", "2", "--max-train", "128", "--max-test", "60", "--latency-batch", "4",
            "--target-sparsity", "0.6", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "res"), "--quiet"]
    res = _load("experiments/blocks_compare").main(args)
    assert set(res["variants"]) == {"channels", "blocks", "both"}
    for name, v in res["variants"].items():
        assert 0 <= v["macs_sparsity"] < 1 and v["macs"] <= v["dense_macs"]
        assert v["macs_sparsity"] == pytest.approx(1 - v["macs"] / v["dense_macs"])
        assert v["depth"] <= v["dense_depth"] == 20
        assert (v["gated_blocks"] == 9) == (name != "channels")
        assert v["latency_speedup"] > 0
    md = next((tmp_path / "res").glob("blocks-digits-resnet20-*.md")).read_text()
    assert "| blocks |" in md and "| both |" in md
    again = _load("experiments/blocks_compare").main(args)      # every run is read back, not repeated
    assert again["variants"] == res["variants"]
    with pytest.raises(SystemExit, match="target-sparsity"):
        _load("experiments/blocks_compare").main(args + ["--target-sparsity", "1.5"])


def test_equal_budget_arms_share_the_budget_and_resume(tmp_path):
    eb = _load("experiments/equal_budget")
    args = ["--preset", "digits", "--epochs", "3", "--max-train", "96", "--seeds", "0", "--quiet", "--no-write",
            "--work", str(tmp_path / "work")]
    report = eb.main(args)
    rows = {r["arm"]: r for r in report["rows"]}
    assert set(rows) == set(eb.ARMS)
    assert abs(rows["one-pass"]["sparsity"]["macs"] - 0.5) <= 0.005        # the exact target
    assert rows["dense"]["sparsity"]["macs"] == 0
    # Torch-Pruning's ratio is bisected to the one-pass MACs; from scratch is the same architecture
    assert abs(rows["train-prune-finetune"]["sparsity"]["macs"] - rows["one-pass"]["sparsity"]["macs"]) <= 0.02
    assert rows["from-scratch"]["pruned"] == rows["train-prune-finetune"]["pruned"]
    assert rows["learned-from-scratch"]["pruned"] == rows["one-pass"]["pruned"]   # the learned architecture
    assert rows["train-prune-finetune"]["split"] == [2, 1]
    # every arm reports its training cost: the one pass computed fewer training MACs than dense (it trains the
    # extracted network after the freeze), the fine-tuned arm fewer than dense too
    for arm, row in rows.items():
        assert row["training"]["seconds"] > 0 and row["training"]["macs"] > 0, arm
    assert rows["one-pass"]["training"]["switch_step"] is not None
    assert rows["one-pass"]["training"]["macs"] < rows["dense"]["training"]["macs"]
    assert rows["train-prune-finetune"]["training"]["macs"] < rows["dense"]["training"]["macs"]
    assert "training MACs" in eb.markdown(report)
    # finished arms are read back, not rerun
    again = eb.main(args)
    assert [r["seconds"] for r in again["rows"]] == [r["seconds"] for r in report["rows"]]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{eb.START}\nold\n{eb.END}\nrest\n")
    result = tmp_path / "equal-budget-x.json"
    result.write_text(json.dumps(report))
    eb.update_readme([result], readme)
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert text.count("| digits") == 5 and "from-scratch" in text
    # equal training MACs: the from-scratch arms get the epochs the dense run's MACs pay for (new folders)
    equal = eb.main(args + ["--arms", "one-pass", "train-prune-finetune", "from-scratch", "learned-from-scratch",
                            "--equal-macs"])
    eq = {r["arm"]: r for r in equal["rows"]}
    for arm in ("from-scratch", "learned-from-scratch"):
        want = int(3 * eq[arm]["dense"]["macs"] // eq[arm]["pruned"]["macs"])
        assert eq[arm]["equal_macs"] and eq[arm]["epochs"] == want >= 5, (arm, eq[arm]["epochs"])
    assert eq["one-pass"]["seconds"] == rows["one-pass"]["seconds"]          # read back
    assert "Equal training MACs" in eb.markdown(equal)


def test_pretrained_start_and_its_score_criteria_run(tmp_path):
    """The dense network trained once per seed; the one pass and Torch-Pruning's arm from its weights, at the
    one pass's MACs; another ranking criterion (score_criteria.py) reuses the same dense network."""
    ps = _load("experiments/pretrained_start")
    sc = _load("experiments/score_criteria")
    args = ["--preset", "digits", "--epochs", "1", "--max-train", "96", "--seeds", "0", "--targets", "0.5",
            "--finetune-epochs", "1", "--quiet", "--work", str(tmp_path / "work"), "--out", str(tmp_path)]
    report = ps.main(args + ["--arms", "one-pass", "tp-uniform"])
    rows = {r["arm"]: r for r in report["rows"]}
    assert abs(rows["one-pass"]["sparsity"]["macs"] - 0.5) <= 0.005
    assert abs(rows["tp-uniform"]["sparsity"]["macs"] - rows["one-pass"]["sparsity"]["macs"]) <= 0.05
    assert (tmp_path / "pretrained-start-digits.md").is_file()
    dense = (tmp_path / "work" / "dense-seed0" / "result.json").read_text()
    from polarprune_cuda.train import runs

    before = runs.scores_from_magnitude
    sc.main(["--criterion", "taylor-global", *args, "--arms", "one-pass", "--tag", "taylor"])
    assert runs.scores_from_magnitude is before is pp.scores_from_magnitude           # put back
    assert (tmp_path / "work" / "dense-seed0" / "result.json").read_text() == dense      # not trained again
    taylor = json.loads((tmp_path / "pretrained-start-digits-taylor.json").read_text())
    assert abs(taylor["rows"][0]["sparsity"]["macs"] - 0.5) <= 0.005


def test_latency_layers_writes_every_layer_of_the_extracted_network(tmp_path):
    """The layer-by-layer look at a latency prediction, on ResNet-20 at batch 2 with round_to 8: a row per layer
    with its three times, the whole network and the spread of one convolution."""
    ll = _load("experiments/latency_layers")
    assert ll.main(["--model", "resnet20", "--batch", "2", "--round-to", "8", "--passes", "2", "--calls", "10",
                    "--cache", str(tmp_path / "cache.json"), "--out", str(tmp_path), "--tag", "smoke"]) == 0
    record = json.loads((tmp_path / "latency-layers-resnet20-smoke.json").read_text())
    assert len(record["rows"]) == 43 and all(r["alone_ms"] > 0 and r["inside_ms"] > 0 for r in record["rows"])
    assert all(r["c_out"] % 8 == 0 for r in record["rows"] if r["layer"] != "fc")   # round_to honoured
    assert record["spread"]["min"] <= record["spread"]["p50"] <= record["spread"]["max"]
    assert "| layer1.0.conv1 |" in (tmp_path / "latency-layers-resnet20-smoke.md").read_text()


def test_latency_prediction_runs_and_renders_again(tmp_path):
    """The latency cost's experiment on ResNet-20 at batch 2, one target: both costs timed, the record's
    Markdown written again from its JSON the same."""
    lp = _load("experiments/latency_prediction")
    args = ["--models", "resnet20", "--targets", "0.5", "--batch", "2", "--max-seconds", "2", "--timing-seconds", "0.5",
            "--cache", str(tmp_path / "cache.json"), "--out", str(tmp_path), "--tag", "smoke"]
    assert lp.main(args) == 0
    record = json.loads((tmp_path / "latency-prediction-smoke.json").read_text())
    assert [(r["cost"], r["target"]) for r in record["rows"]] == [("latency", 0.5), ("macs", 0.5)]
    assert all(r["predicted_ms"] > 0 and r["speedup"] > 0 for r in record["rows"])
    assert abs(record["rows"][1]["macs_share"] - 0.5) <= 0.01   # the MACs target is met on the extracted network
    md = (tmp_path / "latency-prediction-smoke.md").read_text()
    assert (tmp_path / "latency-prediction-smoke.png").is_file() and "| resnet20 | latency | 0.50 |" in md
    assert lp.main(["--render", str(tmp_path / "latency-prediction-smoke.json")]) == 0
    assert (tmp_path / "latency-prediction-smoke.md").read_text() == md


def test_the_second_gpu_command_runs_its_seeds_in_parallel_and_merges_them(tmp_path):
    """benchmarks/gpu_second.sh in its dry run (digits, 1 epoch, 96 images, seeds 0 and 1 as two processes on
    the CPU): three files come back, the merged result holds both seeds' dense and one-pass rows; --merge refuses
    results of another recipe."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "WORK": str(work)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_second.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["campaign2.log", "equal-budget-digits-gpu.json",
                                                     "equal-budget-digits-gpu.md"]
    merged = json.loads((out / "equal-budget-digits-gpu.json").read_text())
    assert sorted((r["seed"], r["arm"]) for r in merged["rows"]) == [(0, "dense"), (0, "one-pass"), (1, "dense"),
                                                                    (1, "one-pass")]
    assert merged["summary"]["one-pass"]["seeds"] == [0, 1]
    log = (out / "campaign2.log").read_text()
    assert "seed 0: exit 0" in log and "seed 1: exit 0" in log and "merged 2 seed(s): exit 0" in log
    eb = _load("experiments/equal_budget")
    other = json.loads((work / "results" / "equal-budget-digits-gpu-seed1.json").read_text())
    other["recipe"]["epochs"] = 2
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="another recipe"):
        eb.main(["--merge", str(work / "results" / "equal-budget-digits-gpu-seed0.json"), str(tmp_path / "other.json"),
                 "--results", str(tmp_path)])
