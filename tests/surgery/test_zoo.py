"""Any CNN a user brings: the zoo models end exact through attach, close, extract, count, save and load, or are
refused or skipped by name (benchmarks/experiments/zoo.py; the whole zoo: `make zoo`).

Random weights and BatchNorm statistics, nothing downloaded. What is asserted is exact by construction:
the outcome class, the equality of counted and predicted params/MACs, the bit-equality of the reloaded
model, and an output difference at float rounding (1e-4 of the largest output, after one forward pass).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm", reason="timm is a test dependency (make test installs it)")
pytest.importorskip("torchvision", reason="torchvision is a test dependency (make test installs it)")

ROOT = Path(__file__).resolve().parents[2]


def _zoo():
    spec = importlib.util.spec_from_file_location("bench_zoo", ROOT / "benchmarks" / "experiments" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


zoo = _zoo()

#: what each quick model must end as: exact with every group gated, exact with some skipped, or refused
EXPECTED = {
    "tv:densenet121": "exact", "tv:mnasnet0_5": "exact", "timm:efficientnet_lite0": "exact",
    "timm:repvgg_a0": "exact", "timm:ghostnet_100": "exact-skipping", "timm:cspresnet50": "exact-skipping",
    "tv:shufflenet_v2_x0_5": "refused", "tv:resnet18": "exact", "tv:mobilenet_v3_small": "exact",
    "tv:squeezenet1_1": "exact", "timm:rexnet_100": "refused", "timm:vit_tiny_patch16_224": "refused",
}


def _outcome(row: dict) -> str:
    if row["result"] == "exact":
        return "exact-skipping" if row["skipped"] else "exact"
    return row["result"]


def test_the_quick_list_is_the_expected_list():
    assert set(zoo.QUICK) == set(EXPECTED)


@pytest.mark.parametrize("key", zoo.QUICK)
def test_quick_zoo_model(key):
    import torch

    threads = torch.get_num_threads()
    row = zoo.run_one(key, with_tp=False)
    assert torch.get_num_threads() == threads    # the process's thread count is left as it was (later tests
    #                                              compare runs in this process with runs in child processes)
    assert _outcome(row) == EXPECTED[key], row.get("reason", row)
    if row["result"] == "exact":
        assert row["rel_diff"] <= 1e-4 and row["count_equals_prediction"] and row["reload_equal"]
        assert row["params"][1] < row["params"][0]
        for line in row["skipped"]:   # every skipped group is named, with its reason
            name, _, reason = line.partition(": ")
            assert name and reason and name in reason, line
    else:
        assert row["reason"] and "Traceback" not in row["reason"]


@pytest.mark.zoo
@pytest.mark.parametrize("key", [k for k in zoo.all_models() if k not in zoo.QUICK])
def test_whole_zoo_model(key):
    row = zoo.run_isolated(key, zoo.TIMEOUT, with_tp=False)
    assert row["result"] in ("exact", "refused"), row.get("reason", row)


def test_readme_summary_counts_the_table(tmp_path):
    rows = [
        {"model": "tv:a", "result": "exact", "skipped": [], "torch_pruning": {"result": "pruned"}},
        {"model": "tv:b", "result": "exact", "skipped": ["x: x is tied"], "torch_pruning": {"result": "pruned"}},
        {"model": "tv:c", "result": "refused", "torch_pruning": {"result": "crash"},
         "reason": "no channel group of the model can be gated:\n  - l: ln (LayerNorm) is in the channel group"},
        {"model": "timm:d", "result": "timeout", "reason": "no result within 150 s",
         "torch_pruning": {"result": "timeout"}},
    ]
    result = tmp_path / "zoo-cpu-test.json"
    result.write_text(__import__("json").dumps({"date": "2026-12-04", "machine": "x86_64 CPU, 1 thread",
                                                "command": "python zoo.py", "rows": rows}))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{zoo.START}\nstale\n{zoo.END}\noutro\n")
    zoo.update_readme(result, readme)
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "of 4 models, **2 exact** (1 with every channel group gated, 1 with some groups left ungated" in text
    assert "1 refused by name, 1 without a result (timm:d)" in text
    assert "| LayerNorm (transformers, ConvNeXt) | 1 |" in text
    assert "Torch-Pruning alone on the same models: 2 pruned, 1 crash, 1 timeout." in text
    assert "[benchmarks/results/zoo-cpu-test.md]" in text
