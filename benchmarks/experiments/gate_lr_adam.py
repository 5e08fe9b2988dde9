"""The gate learning rate of an Adam-type optimizer, measured: OnePass in a plain loop with AdamW, the gate
group's learning rate ``c / window`` (window: the steps from the warm-up to the freeze) for several ``c``.

    python benchmarks/experiments/gate_lr_adam.py [--dataset digits] [--epochs 20] [--seeds 0 1] [--c 0.5 1 2 4 8 16]

Per run: the fraction of gates polarized when they freeze (the penalty's work done: above 0.5 the target is met
on trained scores), the achieved MACs removed, test accuracy of the extracted network. Hypothesis: an Adam step
moves a score by about its learning rate, so ``c`` of a few units (a score starts at 1.0 and must cross 0 to
close) polarizes the gates; much smaller ``c`` leaves them near their start, much larger makes them oscillate.
Results: benchmarks/results/gate-lr-adamw-<dataset>.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _record  # noqa: E402
import polarprune_cuda as pp  # noqa: E402
from polarprune_cuda.models import build_model  # noqa: E402
from polarprune_cuda.train import data as data_mod  # noqa: E402
from polarprune_cuda.train.loop import evaluate  # noqa: E402
from polarprune_cuda.train.onepass import FREEZE, WARMUP  # noqa: E402


def run(data, c: float, seed: int, epochs: int, batch: int = 64, target: float = 0.5) -> dict:
    torch.manual_seed(seed)
    channels = data.train_x.shape[1]
    model = build_model("resnet20", data.num_classes, channels, False)
    example = data.example_input(1)
    pp.attach_gates(model, example, min_channels=4)
    steps = epochs * data_mod.num_batches(len(data.train_y), batch)
    window = int(FREEZE * steps) - int(round(WARMUP * steps))   # as OnePass counts it
    weights, scores = pp.split_parameters(model)
    opt = torch.optim.AdamW([{"params": weights}, {"params": scores, "lr": max(c, 1.0) / window,
                                                   "weight_decay": 0.0}], lr=1e-3, weight_decay=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = pp.OnePass(model, example, target, steps, opt, cost="macs")
        # c < 1 is what OnePass refuses (a score cannot cross 0 in the window): set after its check, to measure it
        opt.param_groups[1]["lr"] = c / window
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            for x, y in data_mod.batches(data.train_x, data.train_y, batch, seed=seed, epoch=epoch, pad=data.pad,
                                         flip=data.flip):
                loss = F.cross_entropy(pruner.model(x), y) + pruner.penalty()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                pruner.step()
    small = pruner.finish()
    acc = evaluate(small, data.test_x, data.test_y)
    return {"c": c, "seed": seed, "gate_lr": c / window, "window": window, "steps": steps,
            "polarized_at_freeze": pruner.polarized_at_freeze,
            "macs_removed": pruner.budget["achieved_sparsity"], "accuracy": acc,
            "seconds": time.perf_counter() - t0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--c", type=float, nargs="+", default=[0.5, 1, 2, 4, 8, 16])
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    data = data_mod.load_dataset(args.dataset, max_train=args.max_train)
    rows = []
    for c in args.c:
        for seed in args.seeds:
            rows.append(run(data, c, seed, args.epochs))
            r = rows[-1]
            print(f"c={c:g} seed={seed}: polarized {r['polarized_at_freeze']:.3f}, MACs removed "
                  f"{r['macs_removed']:.4f}, accuracy {r['accuracy']:.4f} ({r['seconds']:.0f} s)", flush=True)
    table = ["| c | gate lr | polarized at freeze (mean, min) | MACs removed | accuracy (mean ± sd) |",
             "|---:|---:|---|---:|---|"]
    for c in args.c:
        rs = [r for r in rows if r["c"] == c]
        pol = [r["polarized_at_freeze"] for r in rs]
        acc = [r["accuracy"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        table.append(f"| {c:g} | {rs[0]['gate_lr']:.4g} | {statistics.mean(pol):.3f}, {min(pol):.3f} | "
                     f"{statistics.mean(r['macs_removed'] for r in rs):.4f} | {statistics.mean(acc):.4f} ± {sd:.4f} |")
    cmd = _record.command("gate_lr_adam.py", argv)
    text = (f"# Gate learning rate for AdamW: c / window\n\nCommand: `{cmd}`  \n"
            f"ResNet-20 on {args.dataset}, {args.epochs} epochs, batch 64, AdamW (lr 1e-3, weight decay 0.05, cosine), "
            f"OnePass at 50% of MACs (warm-up 1/12, ramp 1/6, freeze 0.3; window {rows[0]['window']} steps of "
            f"{rows[0]['steps']}), seeds {args.seeds}. CPU.\n\n" + "\n".join(table) + "\n")
    _record.write(args.out, f"gate-lr-adamw-{args.dataset}", {"command": cmd, "rows": rows}, text)
    return rows


if __name__ == "__main__":
    main()
