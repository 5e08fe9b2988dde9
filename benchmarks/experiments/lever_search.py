"""The lever search of the one-pass recipe: each lever moved alone from the base recipe, measured over seeds.

    .venv/bin/python benchmarks/experiments/lever_search.py --preset digits
    .venv/bin/python benchmarks/experiments/lever_search.py --preset fashion-12k --variants base freeze0.5 ...

Every variant is the one-pass arm of benchmarks/experiments/equal_budget.py with some
PruneConfig fields changed (VARIANTS below is the record of what was tried);
the other arms come from the equal-budget result of the same preset
(``--reference``), whose seeds and recipe they share. Each run is a job under
--work with its result in a JSON file, so the search resumes where it stopped.
Writes benchmarks/results/equal-budget-levers-<preset>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _record  # noqa: E402
import equal_budget  # noqa: E402

#: name -> (PruneConfig overrides, the hypothesis it tests)
VARIANTS = {
    "base": ({}, "the base recipe"),
    "freeze0.5": ({"freeze_gates_at": 0.5}, "the final architecture trains longer after the freeze"),
    "freeze0.3": ({"freeze_gates_at": 0.3}, "even longer: prune early, train the small net most of the run"),
    "warmup3": ({"warmup_epochs": 3.0}, "more dense pre-training before the penalty orders the channels"),
    "ramp1": ({"ramp_epochs": 1.0}, "reach the target quickly, more epochs at the final density"),
    "dual": ({"target_control": "dual"}, "dual ascent: the soft density tracks the target, fewer flips at "
             "the freeze"),
    "gate-lr0.1": ({"gate_lr": 0.1}, "slower gates: less overshoot of the density"),
    "gate-lr2": ({"gate_lr": 2.0}, "faster gates: polarize sooner"),
    "target-weight5": ({"target_weight": 5.0}, "task loss weighs more against the density term"),
    "polar0": ({"polarization_weight": 0.0}, "no polarization term: the freeze-time choice polarizes anyway"),
    "polar1": ({"polarization_weight": 1.0}, "strong polarization: fewer gates near 0.5 at the freeze"),
    "init3": ({"score_init": 3.0}, "gates start far from closing: the weights decide longer"),
    "init0.1": ({"score_init": 0.1}, "gates start near the boundary: the ranking forms sooner"),
    "ste-clipped": ({"ste": "clipped"}, "no gradient to far-gone scores"),
    "ste-sigmoid": ({"ste": "sigmoid"}, "smooth straight-through gradient"),
    "freeze-lr0.5": ({"freeze_lr_scale": 0.5}, "a gentler learning rate for the final architecture"),
    "freeze0.2": ({"freeze_gates_at": 0.2}, "prune earlier still"),
    "gate-lr0.1-dual": ({"gate_lr": 0.1, "target_control": "dual"}, "slow gates, density held on target"),
    "target-weight80": ({"target_weight": 80.0}, "the density term dominates: the target is reached sooner"),
    "warmup0.25": ({"warmup_epochs": 0.25}, "less dense pre-training, more time at the final architecture"),
    "warmup1": ({"warmup_epochs": 1.0}, "more dense pre-training before the penalty orders the channels"),
    "gate-lr0.1-freeze0.2": ({"gate_lr": 0.1, "freeze_gates_at": 0.2}, "slow gates without the collapse, and "
                             "the final architecture fixed early"),
    "gate-lr0.1-polar1": ({"gate_lr": 0.1, "polarization_weight": 1.0}, "slow gates polarized harder: the "
                          "hard gates agree with the soft density at the freeze, fewer flips"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="digits", choices=sorted(equal_budget.PRESETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--base", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="the base recipe every variant starts from (PruneConfig fields)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="a variant of your own, named by --name")
    parser.add_argument("--name", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--reference", default=None,
                        help="equal-budget result with the other arms (default results/equal-budget-<preset>.json)")
    parser.add_argument("--record", default=None,
                        help="stem of the result files (default equal-budget-levers-<preset>); one per base recipe")
    parser.add_argument("--work", default=None, help="folder of the runs (default runs/<record>)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quiet", action="store_true")
    return parser


def _measure(name: str, overrides: dict, why: str, args, preset: dict, base: dict, work: Path) -> dict:
    """One variant over every seed: the one-pass arm with the base recipe and this variant's overrides."""
    rows = []
    for seed in args.seeds:
        kwargs = dict(model="resnet20", target_sparsity=0.5, cost="macs", data_dir=args.data_dir, seed=seed,
                      **preset) | base | overrides
        row = equal_budget.run_arm("one-pass", kwargs, work / name, not args.quiet, 2 / 3, 0.1, None)
        rows.append({k: row[k] for k in ("seed", "accuracy", "gated_accuracy", "sparsity", "seconds", "budget")})
        print(f"{name} seed {seed}: {100 * row['accuracy']:.2f}% ({100 * row['sparsity']['macs']:.1f}% MACs "
              f"removed, {row['budget']['opened']} opened / {row['budget']['closed']} closed at the freeze)",
              file=sys.stderr)
    acc = [r["accuracy"] for r in rows]
    return {"overrides": overrides, "hypothesis": why, "rows": rows, "accuracy_mean": statistics.mean(acc),
            "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "flips_mean": statistics.mean(r["budget"]["opened"] + r["budget"]["closed"] for r in rows)}


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    import torch

    variants = {k: VARIANTS[k] for k in args.variants if k in VARIANTS}
    unknown = [k for k in args.variants if k not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if args.set:
        if not args.name:
            raise SystemExit("--set needs --name")
        variants[args.name] = (equal_budget._parse_set(args.set), "given on the command line")
    preset = dict(equal_budget.PRESETS[args.preset])
    if args.epochs:
        preset["epochs"] = args.epochs
    if args.max_train:
        preset["max_train"] = args.max_train
    base = equal_budget._parse_set(args.base)
    stem = args.record or f"equal-budget-levers-{args.preset}"
    work = Path(args.work or f"runs/{stem}")
    out_path = equal_budget.RESULTS / f"{stem}.json"
    record = json.loads(out_path.read_text()) if out_path.is_file() else {"variants": {}}
    for name, (overrides, why) in variants.items():
        record["variants"][name] = _measure(name, overrides, why, args, preset, base, work)
    ref_path = Path(args.reference) if args.reference else equal_budget.RESULTS / f"equal-budget-{args.preset}.json"
    record["reference"] = json.loads(ref_path.read_text())["summary"] if ref_path.is_file() else None
    record["preset"] = preset
    record["base"] = base
    record["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    record["command"] = _record.command("lever_search.py", argv)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=1))
    out_path.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    return record


def markdown(record: dict) -> str:
    p = record["preset"]
    lines = [f"# Lever search, one pass: resnet20 on {p['dataset']}"
             + (f" ({p['max_train']:,} training images)" if p.get("max_train") else ""),
             "", f"{p['epochs']} epochs, batch {p['batch_size']}, lr {p['lr']}, 50% of MACs; each variant moves "
             "one lever from the base recipe ("
             + (", ".join(f"{k}={v}" for k, v in record.get("base", {}).items()) or "the defaults")
             + "). Flips: gates the exact budget opened or closed at the freeze.", "",
             "| variant | change | hypothesis | accuracy mean ± sd | seeds | flips |", "|---|---|---|---:|---|---:|"]
    for name, v in record["variants"].items():
        change = ", ".join(f"{k}={val}" for k, val in v["overrides"].items()) or "-"
        seeds = " / ".join(f"{100 * r['accuracy']:.2f}" for r in v["rows"])
        lines.append(f"| {name} | {change} | {v['hypothesis']} | {100 * v['accuracy_mean']:.2f} ± "
                     f"{100 * v['accuracy_sd']:.2f} | {seeds} | {v['flips_mean']:.0f} |")
    ref = record.get("reference")
    if ref:
        lines += ["", "Reference arms (benchmarks/results/equal-budget-*.json, same seeds and recipe): "
                  + "; ".join(f"{arm} {100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_sd']:.2f}"
                              for arm, r in ref.items())]
    lines += ["", "```", record["command"], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
