"""Channel gates vs block gates vs both, at the same MACs target, same recipe and seed.

    .venv/bin/python benchmarks/experiments/blocks_compare.py --preset quick     # digits, ResNet-20 (CPU: minutes)
    .venv/bin/python benchmarks/experiments/blocks_compare.py --preset fashion   # Fashion-MNIST, ResNet-56 (CPU: about 40 min)

Every variant is `polarprune prune` with the preset's recipe: `channels`
(channel gates only), `blocks` (`--blocks-only`: one gate per residual block)
and `both` (`--blocks`), plus the dense model trained with the same recipe.
Each run has its own folder under --work, so an interrupted comparison
resumes where it stopped (finished runs are not repeated, a run in progress
continues from its last epoch). For each variant: test accuracy of the
extracted model, achieved MACs and params sparsity, depth, removed blocks and
the latency of the extracted model against the dense one, measured side by
side. Results: benchmarks/results/blocks-<dataset>-<model>-<date>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _record  # noqa: E402

RESULTS = HERE.parent / "results"

PRESETS = {
    "quick": {"dataset": "digits", "model": "resnet20", "epochs": 30, "batch_size": 64, "lr": 0.05,
              "max_train": None, "warmup_epochs": 1.0, "ramp_epochs": 4.0},
    "fashion": {"dataset": "fashion-mnist", "model": "resnet56", "epochs": 6, "batch_size": 128, "lr": 0.1,
                "max_train": 12000, "warmup_epochs": 0.5, "ramp_epochs": 2.0},
}
VARIANTS = {"channels": {}, "blocks": {"blocks": True, "channel_gates": False}, "both": {"blocks": True}}


def _folder(kw: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in sorted(kw.items()) if k not in ("data_dir", "device"))


def run_variant(kw: dict, work: Path, latency_batch: int, progress: bool) -> dict:
    from polarprune_cuda.train import report as report_mod
    from polarprune_cuda import train

    out = work / _folder(kw)
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = train.PruneConfig(**kw)
    res = train.run_prune(cfg, out, resume=(out / "checkpoint.pt").is_file(), progress=progress)
    example = res.data.example_input(latency_batch).to(cfg.device)
    lat = report_mod.latency_side_by_side({"dense": res.dense_model, "pruned": res.pruned_model}, example)
    dense, pruned = res.dense_count, res.pruned_count
    blocks = res.blocks or {}
    from polarprune_cuda.surgery.blocks import depth

    row = {
        "accuracy": res.pruned_accuracy,
        "gated_accuracy": res.gated_accuracy,
        "macs_sparsity": 1 - pruned["macs"] / dense["macs"],
        "params_sparsity": 1 - pruned["params"] / dense["params"],
        "macs": pruned["macs"], "params": pruned["params"],
        "dense_macs": dense["macs"], "dense_params": dense["params"],
        "channels_kept": res.channels[0], "channels_total": res.channels[1],
        "depth": depth(res.pruned_model, example[:1]), "dense_depth": depth(res.dense_model, example[:1]),
        "removed_blocks": blocks.get("removed", []), "gated_blocks": len(blocks.get("gated", [])),
        "latency_speedup": lat["dense"]["median_ms"] / lat["pruned"]["median_ms"],
        "latency_ms": {"dense": lat["dense"]["median_ms"], "pruned": lat["pruned"]["median_ms"]},
        "seconds": res.seconds,
    }
    done.write_text(json.dumps(row))
    return row


def run_dense(kw: dict, work: Path, progress: bool) -> dict:
    from polarprune_cuda import train

    out = work / ("dense-" + _folder({k: v for k, v in kw.items() if k != "target_sparsity"}))
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    row = {"accuracy": train.run_dense(train.PruneConfig(**kw), out, progress=progress)}
    done.write_text(json.dumps(row))
    return row


def markdown(res: dict) -> str:
    lines = [f"# Channel gates vs block gates vs both: {res['model']} on {res['dataset']} ({res['date']})", "",
             f"Recipe: {res['recipe']}. Seed {res['seed']}. Target: {100 * res['target']:.0f}% of MACs removed "
             f"(cost macs) for every variant. Accuracy is measured on the extracted model over "
             f"{res['test_images']} test images (one image = {100 / res['test_images']:.2f} points); dense "
             f"(same recipe, no gates): {100 * res['dense_accuracy']:.2f}%. Latency: extracted vs dense, median "
             f"of interleaved rounds in one process, batch {res['latency_batch']}, {res['device']}.", "",
             "| variant | accuracy | vs dense | MACs removed | params removed | depth | blocks removed | "
             "channels kept | latency speedup |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["variants"].items():
        kept = f"{r['channels_kept']} / {r['channels_total']}" if r["channels_total"] else "-"
        blocks = f"{len(r['removed_blocks'])} / {r['gated_blocks']}" if r["gated_blocks"] else "-"
        lines.append(f"| {name} | {100 * r['accuracy']:.2f}% | {100 * (r['accuracy'] - res['dense_accuracy']):+.2f} | "
                     f"{100 * r['macs_sparsity']:.1f}% | {100 * r['params_sparsity']:.1f}% | "
                     f"{r['dense_depth']} -> {r['depth']} | {blocks} | {kept} | {r['latency_speedup']:.2f}x |")
    lines += ["", "Removed blocks:", ""]
    for name, r in res["variants"].items():
        if r["gated_blocks"]:
            lines.append(f"- {name}: {', '.join(r['removed_blocks']) or 'none'}")
    lines += ["", "Command:", "", "```", res["command"], "```", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    parser.add_argument("--model", default=None, help="override the preset's model")
    parser.add_argument("--target-sparsity", type=float, default=0.5, help="fraction of MACs to remove")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    parser.add_argument("--max-train", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--max-test", type=int, default=None, help="use only the first N test images")
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("runs/blocks-compare"),
                        help="folder of the individual runs (resumable)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not 0 < args.target_sparsity < 1:
        raise SystemExit(f"--target-sparsity must be in (0, 1), got {args.target_sparsity}")
    preset = dict(PRESETS[args.preset])
    for key in ("model", "epochs", "max_train"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    from tqdm.auto import tqdm

    base = {**preset, "seed": args.seed, "device": args.device, "data_dir": args.data_dir,
            "max_test": args.max_test, "cost": "macs", "target_sparsity": args.target_sparsity}
    jobs = ["dense", *args.variants]
    results = {}
    for job in tqdm(jobs, desc="runs", disable=args.quiet, file=sys.stderr):
        if job == "dense":
            results[job] = run_dense(base, args.work, progress=not args.quiet)
        else:
            results[job] = run_variant(base | VARIANTS[job], args.work, args.latency_batch, progress=not args.quiet)
    from polarprune_cuda.train import data as data_mod

    test_images = len(data_mod.load_dataset(preset["dataset"], args.data_dir, max_test=args.max_test).test_y)
    recipe = {k: v for k, v in preset.items() if k not in ("dataset", "model") and v is not None}
    res = {
        "dataset": preset["dataset"], "model": preset["model"], "date": datetime.date.today().isoformat(),
        "seed": args.seed, "target": args.target_sparsity, "test_images": test_images,
        "latency_batch": args.latency_batch, "device": args.device,
        "recipe": ", ".join(f"{k} {v}" for k, v in recipe.items()) +
                  ", SGD momentum 0.9, weight decay 5e-4, cosine lr, gates frozen for the last 20%",
        "dense_accuracy": results["dense"]["accuracy"],
        "variants": {k: v for k, v in results.items() if k != "dense"},
        "command": _record.command("blocks_compare.py", argv),
    }
    stem = f"blocks-{preset['dataset']}-{preset['model']}-{res['date']}"
    _record.write(args.out, stem, res, markdown(res))
    return res


if __name__ == "__main__":
    main()
