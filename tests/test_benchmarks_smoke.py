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


def test_kernel_benchmark_quick(tmp_path):
    result = _load("micro/kernels").main(["--quick", "--out", str(tmp_path)])
    assert {"eager", "compile"} <= set(result["providers"])
    ops = {r["op"] for r in result["rows"]}
    assert {"copy", "channel_gate forward", "channel_gate backward", "bank gates + penalty forward"} <= ops
    assert all(r["us"] > 0 for r in result["rows"])
    assert len(list(tmp_path.glob("kernels-*.json"))) == 1


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


def _gpu_checks(args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "POLARPRUNE_BACKEND"} | {"TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_checks.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_gpu_checks_tiny_on_cpu_records_every_case(tmp_path):
    """gpu_checks.py on CPU tensors under Triton's interpreter: the checks pass, a deliberate failure and an
    exception are recorded (not raised), the CUDA provider is skipped with its reason, the summary is written."""
    out = _gpu_checks(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--inject-failure",
                       "--sections", "correctness,limits,determinism"])
    assert out.returncode == 1, out.stdout + out.stderr        # 1: the injected failures
    res = json.loads((tmp_path / "checks.json").read_text())
    assert res["format"] == 1 and res["mode"] == "tiny" and res["device"] == "cpu"
    assert set(res["sections"]) == {"correctness", "limits", "determinism"}
    assert all(s["status"] == "done" and s["budget_s"] > 0 for s in res["sections"].values())
    assert res["facts"]["torch"] == torch.__version__
    assert res["providers"]["triton"]["available"] and not res["providers"]["cuda"]["available"]
    cases = res["cases"]
    for c in cases:
        assert {"section", "name", "status", "seconds"} <= set(c) and c["status"] in ("pass", "fail", "error",
                                                                                        "skipped")
    cuda = [c for c in cases if c.get("provider") == "cuda"]
    assert cuda and all(c["status"] == "skipped" and "cuda" in c["detail"].lower() for c in cuda)
    triton = [c for c in cases if c.get("provider") == "triton"]
    assert triton and all(c["status"] == "pass" for c in triton), [c for c in triton if c["status"] != "pass"]
    ops = {c["op"] for c in triton if c["section"] == "correctness"}
    assert ops == {"binary_gate", "gate_penalty", "gate_bank", "channel_gate", "gated_affine"}
    assert {c["dtype"] for c in triton if c["section"] == "correctness"} == {"float32", "float16", "bfloat16",
                                                                             "float64"}
    assert {c.get("layout") for c in triton if c.get("op") == "channel_gate"} == {"NCHW", "channels_last"}
    assert len([c for c in triton if c["section"] == "limits"]) == 3
    assert any(c["section"] == "determinism" and c["op"].startswith("channel_gate_backward") for c in triton)
    errors = triton[0]["metrics"]["errors"]
    assert all(v["err"] <= v["limit"] for v in errors.values())
    injected = {c["name"]: c for c in cases if c["name"].startswith("deliberate")}
    assert injected["deliberate exception"]["status"] == "error"
    assert "RuntimeError: deliberate failure" in injected["deliberate exception"]["traceback"]
    assert injected["deliberate wrong result"]["status"] == "fail"

    # the summary reads what is there (no timings, no tests, no sanitizer) and says so
    summ = _gpu_checks(["--summary", str(tmp_path)])
    assert summ.returncode == 0, summ.stderr
    text = (tmp_path / "summary.md").read_text()
    assert "deliberate wrong result" in text and "**not measured**" in text and "no sanitizer.txt" in text
    assert re.search(r"\| correctness \| \d+ \| 1 \| 1 \|", text)


def test_gpu_checks_timings_bank_and_training_tiny(tmp_path):
    out = _gpu_checks(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--json", "timings.json",
                       "--sections", "timings,bank,training"])
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads((tmp_path / "timings.json").read_text())
    cases = res["cases"]
    assert not [c for c in cases if c["status"] in ("fail", "error")]
    timed = [c for c in cases if c["section"] == "timings" and c["status"] == "pass"]
    assert {c["provider"] for c in timed} == {"eager", "triton"}
    for c in timed:
        m = c["metrics"]
        assert m["us"] > 0 and m["copy_us"] > 0 and m["of_copy"] == pytest.approx(m["GBps"] / m["copy_GBps"])
    assert {(c["op"], c["direction"]) for c in timed} >= {("channel_gate", "backward"), ("gate_penalty", "forward")}
    skipped = {c["provider"]: c["detail"] for c in cases if c["status"] == "skipped"}
    assert "compile" in skipped and "cuda" in skipped
    bank = {(c.get("path"), c.get("provider"), c.get("direction")) for c in cases
            if c["section"] == "bank" and c["status"] == "pass"}
    assert {("op", "eager", "forward"), ("op", "triton", "backward"), ("package", "torch", None)} <= bank
    train = next(c for c in cases if c["name"].endswith("gated vs unpruned"))
    assert train["status"] == "pass" and train["metrics"]["ratio"] > 0
    summ = _gpu_checks(["--summary", str(tmp_path)])
    text = (tmp_path / "summary.md").read_text()
    assert summ.returncode == 0 and "ResNet-50 training step" in text and "gate bank + penalty" in text


def _step_limits(script: str) -> dict:
    line = re.search(r'^LIMITS="([^"]*)"', script, re.M).group(1)
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split())}


def test_gpu_first_script_parses_and_fits_one_device_command():
    script_path = ROOT / "benchmarks" / "gpu_first.sh"
    assert subprocess.run(["bash", "-n", str(script_path)]).returncode == 0
    script = script_path.read_text()
    limits = _step_limits(script)
    assert sum(limits.values()) <= 480, limits                 # 8 minutes, the device command's budget
    deadline = int(re.search(r"^DEADLINE=(\d+)", script, re.M).group(1))
    assert deadline <= 480
    assert {"facts", "build", "checks", "timings", "tests", "sanitizer", "summary"} <= set(limits)
    for name in limits:                                        # every declared step runs through `step`
        assert re.search(rf"^\s*step {name} ", script, re.M), name
    assert "timeout -k" in script and "POLARPRUNE_PTXAS_VERBOSE=1" in script and "POLARPRUNE_REQUIRE_EXT=1" in script
    # the files it leaves in OUT: at most 8
    outs = set(re.findall(r'\$out/([A-Za-z0-9_.-]+)', script)) | set(re.findall(r"--json (\S+\.json)", script))
    outs -= {"checks.json"} if "/tmp/polarprune-sanitizer" in script else set()
    outs |= {"checks.json", "summary.md"}
    assert len(outs) <= 8, outs


def test_gpu_first_without_a_gpu_stops_after_the_facts(tmp_path):
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_first.sh"), str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    log = (tmp_path / "out" / "campaign.log").read_text()
    assert "STEP facts status=exit-3" in log and "no CUDA device" in log and "STEP summary status=ok" in log
    assert "STEP build" not in log
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
    assert text.count("| digits") == 4 and "from-scratch" in text
