"""A small gated-model example: ``python -m polarprune_cuda.demo``.

Trains a small CNN with gated BatchNorms once, with PolarizationLoss driving the
gates to 0/1 and the network to half of its channels, on a synthetic
10-class image task that is made on the fly (no download). Prints the
backends, the progress and the final gate statistics.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

import polarprune_cuda as pp


class DemoNet(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        layers, c_in = [], 1
        for c_out, stride in ((width, 1), (width, 2), (2 * width, 2), (2 * width, 1)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), pp.GatedBatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def synthetic_digits(n: int, generator: torch.Generator, size: int = 12, classes: int = 10):
    """Noisy images of one of ``classes`` fixed random templates (seeded)."""
    templates = torch.randn(classes, 1, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, classes, (n,), generator=generator)
    images = templates[labels] + 1.5 * torch.randn(n, 1, size, size, generator=generator)
    return images, labels


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-sparsity", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    info = pp.backend_info()
    print("backends:", {k: ("yes" if v["available"] else f"no ({v['reason']})") for k, v in info["backends"].items()})

    model = DemoNet()
    bank = pp.bind_gates(model)
    loss_fn = pp.PolarizationLoss(args.target_sparsity, schedule=pp.ramp(warmup_steps=20, ramp_steps=80))
    n_gates = bank.scores.numel()
    weights = [p for name, p in model.named_parameters() if not name.endswith("bank.scores")]
    opt = torch.optim.SGD([
        {"params": weights, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        # The penalty is a mean over all gates: scale the scores' step by their number.
        {"params": [bank.scores], "lr": 2.0 * n_gates / loss_fn.target_weight, "momentum": 0.9},
    ])
    gen = torch.Generator().manual_seed(args.seed)
    test_x, test_y = synthetic_digits(1000, torch.Generator().manual_seed(10_000 + args.seed))
    start = time.perf_counter()
    for step in range(args.steps):
        x, y = synthetic_digits(64, gen)
        task = F.cross_entropy(model(x), y)
        penalty = loss_fn(model)
        opt.zero_grad()
        (task + penalty).backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            stats = pp.gate_stats(model)
            print(f"step {step:4d}  task {task.item():.3f}  penalty {penalty.item():.4f}  "
                  f"density {stats['density']:.3f} (target {1 - args.target_sparsity:.3f})  "
                  f"polarized {stats['polarized']:.3f}")
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    stats = pp.gate_stats(model)
    result = {
        "target_density": 1 - args.target_sparsity,
        "density": stats["density"],
        "polarized": stats["polarized"],
        "open_per_layer": {k: f"{v['open']}/{v['total']}" for k, v in stats["layers"].items()},
        "test_accuracy": accuracy,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
