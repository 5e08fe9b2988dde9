"""The examples run (tiny budgets) and do what their docstrings say."""
import importlib.util
import warnings
from pathlib import Path

import torch

import polarprune_cuda as pp

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_user_loop_example_prunes_a_torchvision_model_with_adamw():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # 8 steps: the freeze warns that the scores barely trained
        small, pruner = _load("user_loop").main(["--epochs", "1", "--max-steps", "8"])
    assert pruner.switched and isinstance(pruner.optimizer, torch.optim.AdamW)
    example = torch.randn(1, 3, 32, 32)
    dense = pruner.budget["total"]
    assert abs(1 - pp.count(small, example)["macs"] / dense - 0.5) <= 0.005
    assert sum(len(g["params"]) for g in pruner.optimizer.param_groups) == len(list(small.parameters()))
