"""Accuracy at equal measured latency: one pass with ``--cost latency`` against ``--cost macs``.

The equal-budget Fashion-MNIST setting (ResNet-20, 12,000 training images, the 10,000 test images, 6 epochs,
batch 128, lr 0.1), one thread per run, seeds 0-2. Each arm is ``COST:TARGET`` (default: ``latency:0.5``,
``macs:0.5``, ``macs:0.7``: the MACs targets bracket the latency arm's measured speedup). Three steps:

    python benchmarks/experiments/latency_accuracy.py warm              # the latency tables, on a quiet machine
    python benchmarks/experiments/latency_accuracy.py train --arms ... --seeds ...   # (several at once is fine)
    python benchmarks/experiments/latency_accuracy.py measure           # quiet: every run's speedup, side by side

``measure`` times each run's extracted network against the dense one (the report's interleaved rounds, batch
32, one thread), since the training runs' own reports may have been timed beside other work, and writes
``benchmarks/results/latency-accuracy-fashion-12k.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _record  # noqa: E402

SETTING = ["--dataset", "fashion-mnist", "--model", "resnet20", "--max-train", "12000", "--epochs", "6",
           "--batch-size", "128", "--lr", "0.1", "--latency-batch", "32", "--quiet"]
ARMS = ["latency:0.5", "macs:0.5", "macs:0.7"]


def _arm(text: str) -> tuple[str, float]:
    cost, target = text.split(":")
    return cost, float(target)


def warm(work: Path) -> None:
    """Measure (or find in the cache) the latency tables and calibration the latency runs will use."""
    import torch
    import polarprune_cuda as pp
    from polarprune_cuda.train import PruneConfig, data as data_mod, runs

    torch.set_num_threads(1)
    cfg = PruneConfig(dataset="fashion-mnist", model="resnet20", max_train=12000, cost="latency", device="cpu")
    data = data_mod.load_dataset(cfg.dataset, cfg.data_dir, cfg.max_train, cfg.max_test)
    model = runs.build(cfg, data)
    pp.attach_gates(model, data.example_input(1))
    built = pp.latency_cost(model, data.example_input(cfg.latency_batch), progress=True)
    print(f"tables: {len(built.tables)} layers, {built.measured} measured now, {built.seconds:.0f} s; "
          f"calibration {built.calibration}")


def train(work: Path, arms: list[str], seeds: list[int]) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    for seed in seeds:
        for arm in arms:
            cost, target = _arm(arm)
            out = work / f"{cost}-{target}-seed{seed}"
            if (out / "report.json").is_file():
                continue
            cmd = [sys.executable, "-m", "polarprune_cuda", "prune", *SETTING, "--cost", cost, "--target-sparsity",
                   str(target), "--seed", str(seed), "--out", str(out), "--overwrite"]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env=env)


def measure(work: Path, arms: list[str], seeds: list[int], out: Path, argv) -> None:
    import torch
    from polarprune_cuda import cli
    from polarprune_cuda.train import PruneConfig, data as data_mod, report as report_mod, runs

    torch.set_num_threads(1)
    cfg = PruneConfig(dataset="fashion-mnist", model="resnet20", max_train=12000, device="cpu")
    data = data_mod.load_dataset(cfg.dataset, cfg.data_dir, cfg.max_train, cfg.max_test)
    x = data.example_input(32)
    rows = []
    for arm in arms:
        cost, target = _arm(arm)
        for seed in seeds:
            run = work / f"{cost}-{target}-seed{seed}"
            report = json.loads((run / "report.json").read_text())
            small, _ = cli.load_run(run)
            dense = runs.build(PruneConfig(**{**cfg.to_dict(), "seed": seed}), data)
            lat = report_mod.latency_side_by_side({"dense": dense, "pruned": small.eval()}, x, max_seconds=20.0)
            pred = report["latency"].get("predicted")
            rows.append({"arm": arm, "cost": cost, "target": target, "seed": seed,
                         "accuracy": report["accuracy"]["pruned"], "speedup": lat["speedup_rounds"]["median"],
                         "speedup_q": [lat["speedup_rounds"]["q1"], lat["speedup_rounds"]["q3"]],
                         "macs_removed": report["sparsity"]["macs"], "achieved": report["achieved_sparsity"],
                         "predicted_speedup": pred["speedup"] if pred else None,
                         "training_seconds": (report.get("training") or {}).get("run", {}).get("seconds")})
            print(rows[-1], flush=True)
    lines = ["# Accuracy at equal measured latency: --cost latency against --cost macs (Fashion-MNIST 12k)", "",
             "ResNet-20, 12,000 training images, 6 epochs, batch 128, lr 0.1, one thread; speedups measured "
             "afterwards, side by side, batch 32, one thread.", "",
             "The steps (the training runs may go several at once, here two):", "",
             *(f"    {_record.command('latency_accuracy.py', a)}" for a in argv), "",
             "| arm | MACs removed | measured speedup | predicted speedup | accuracy |", "|---|---:|---:|---:|---:|"]
    summary = {}
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm]
        mean = lambda k: statistics.mean(r[k] for r in rs)  # noqa: E731
        sd = lambda k: statistics.stdev(r[k] for r in rs) if len(rs) > 1 else 0.0  # noqa: E731
        summary[arm] = {"accuracy": [mean("accuracy"), sd("accuracy")], "speedup": [mean("speedup"), sd("speedup")],
                        "macs_removed": mean("macs_removed")}
        pred = [r["predicted_speedup"] for r in rs if r["predicted_speedup"]]
        predicted = f"{statistics.mean(pred):.2f}x" if pred else "-"
        lines.append(f"| {arm} | {100 * mean('macs_removed'):.1f}% | {mean('speedup'):.2f}x ± {sd('speedup'):.2f} | "
                     f"{predicted} | {100 * mean('accuracy'):.2f} ± {100 * sd('accuracy'):.2f} |")
    lines += ["", f"Seeds {', '.join(map(str, seeds))}; mean ± standard deviation over the seeds."]
    _record.write(out, "latency-accuracy-fashion-12k", {"commands": [_record.command("latency_accuracy.py", a)
                                                                      for a in argv],
                                                         "rows": rows, "summary": summary}, "\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("warm", "train", "measure"))
    parser.add_argument("--arms", nargs="+", default=ARMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default=str(ROOT / "runs" / "latency-accuracy"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.step == "warm":
        warm(work)
    elif args.step == "train":
        train(work, args.arms, args.seeds)
    else:
        seeds = [str(v) for v in args.seeds]
        steps = [["warm"], ["train", "--arms", *args.arms, "--seeds", *seeds], sys.argv[1:] if argv is None else argv]
        measure(work, args.arms, args.seeds, Path(args.out), steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
