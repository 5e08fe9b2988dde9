"""From a pretrained model: the one pass against Torch-Pruning's pretrained -> prune -> fine-tune, same epochs.

    .venv/bin/python benchmarks/experiments/pretrained_start.py --data-dir /usr/share/datasets/fashion-mnist
    .venv/bin/python benchmarks/experiments/pretrained_start.py --targets 0.5 0.7 --finetune-epochs 2 6 \\
        --set warmup_epochs=0 --tag warmup0

Per seed, the dense network is trained first with the CLI's dense recipe (the preset's epochs, SGD, lr 0.1,
cosine); its weights start every arm, and every arm then trains for the same ``--finetune-epochs`` at the same
``--lr`` (cosine):

- ``one-pass``: ``polarprune prune --init <dense weights>`` (gates on the pretrained network, the penalty, the
  freeze with the exact target, the extracted network trained to the end); ``--set`` overrides its recipe;
- ``tp-uniform``: Torch-Pruning's MetaPruner with group L2 magnitude, every group by one ratio, the ratio
  bisected so the MACs equal the one pass's of the same seed and target; then fine-tuned;
- ``tp-global``: the same with ``global_pruning=True`` (one threshold over all groups), bisected likewise.

Each arm of each seed, target and budget is its own job under --work (its result in a JSON file), so an
interrupted comparison resumes where it stopped. Results: benchmarks/results/pretrained-start-<preset>[-<tag>].md
and .json, per arm mean and spread over the seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _record  # noqa: E402
import equal_budget as eb  # noqa: E402

ARMS = ("one-pass", "tp-uniform", "tp-global")


def _pretrained(cfg_kwargs: dict, work: Path, progress: bool) -> tuple[Path, float]:
    """The dense network of this seed, trained with the preset's recipe: (its state_dict file, its accuracy)."""
    import torch
    from polarprune_cuda import train

    cfg = train.PruneConfig(**cfg_kwargs)
    out = work / f"dense-seed{cfg.seed}"
    weights, done = out / "dense.pt", out / "result.json"
    if done.is_file() and weights.is_file():
        return weights, json.loads(done.read_text())["accuracy"]
    accuracy = train.run_dense(cfg, out / "run", resume=True, progress=progress)
    state = torch.load(out / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    torch.save(state, weights)
    done.write_text(json.dumps({"accuracy": accuracy, "config": cfg.to_dict()}, indent=1))
    return weights, accuracy


def run_arm(arm: str, cfg_kwargs: dict, init: Path, work: Path, progress: bool, target_macs: float | None) -> dict:
    import torch
    from polarprune_cuda.surgery.costs import count
    from polarprune_cuda.train import loop, runs
    from polarprune_cuda import train

    cfg = train.PruneConfig(**cfg_kwargs, init=str(init))
    out = work / f"{arm}-t{cfg.target_sparsity:g}-e{cfg.epochs}-seed{cfg.seed}"
    cached, data, example, dense_count = eb.prepare(arm, cfg, out)
    if cached is not None:
        return cached
    start = time.perf_counter()
    row: dict = {"arm": arm, "seed": cfg.seed, "target": cfg.target_sparsity, "epochs": cfg.epochs}
    if arm == "one-pass":
        small_count = eb._one_pass(cfg, out, row, progress)
    else:
        model = runs.build(cfg, data)
        model.load_state_dict(torch.load(init, map_location=cfg.device, weights_only=True))
        model.eval()
        small, ratio = eb._tp_prune(model, example, target_macs, ignored=["fc", "linear", "classifier"],
                                    global_pruning=arm == "tp-global")
        small.train()
        row["pruning_ratio"] = ratio
        row["pruned_accuracy_before_finetune"] = train.evaluate(small, data.test_x, data.test_y)
        history = loop.fit_loop(small, data, cfg, train.Checkpointer(out / "finetune.pt"), gated=False,
                            epochs=cfg.epochs, lr=cfg.lr, resume=True, progress=progress, label="finetune")
        row["training"] = loop.training_cost(history)
        row["accuracy"] = train.evaluate(small, data.test_x, data.test_y)
        small_count = count(small, example)
    row["seconds"] = time.perf_counter() - start
    row["dense"], row["pruned"] = dense_count, small_count
    row["sparsity"] = eb._sparsity(dense_count, small_count)
    row["config"] = cfg.to_dict()
    (out / "result.json").write_text(json.dumps(row, indent=1))
    return row


def markdown(report: dict) -> str:
    rc = report["recipe"]
    lines = [f"# From a pretrained model: {rc['model']} on {rc['dataset']}"
             + (f" ({rc['max_train']:,} training images)" if rc.get("max_train") else ""), "",
             f"The dense network trained first ({report['pretrain_epochs']} epochs, SGD lr 0.1, cosine; test "
             f"accuracy {report['pretrained_mean']:.2%} ± {report['pretrained_sd']:.2%}); every arm starts from "
             f"its weights and trains for the same epochs at lr {rc['lr']} (cosine), batch {rc['batch_size']}. "
             "Torch-Pruning's arms are bisected to the one pass's MACs of the same seed and target.", "",
             "| MACs target | fine-tuning epochs | arm | accuracy mean ± sd | per seed | MACs removed | params "
             "removed | training steps' time |", "|---:|---:|---|---:|---|---:|---:|---:|"]
    for key, sm in report["summary"].items():
        target, epochs, arm = key.split("|")
        lines.append(f"| {float(target):.0%} | {epochs} | {arm} | {100 * sm['mean']:.2f} ± {100 * sm['sd']:.2f} | "
                     f"{', '.join(f'{100 * a:.2f}' for a in sm['per_seed'])} | {100 * sm['macs']:.1f}% | "
                     f"{100 * sm['params']:.1f}% | {sm['train_seconds']:.0f} s |")
    if report.get("overrides"):
        lines += ["", "One-pass recipe overrides: " + ", ".join(f"`{k}={v}`" for k, v in report["overrides"].items())]
    lines += ["", f"Seeds {report['seeds']}; CPU, {report['threads']} threads, the arms one after the other.", "",
              "```", report["command"], "```", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fashion-12k", choices=sorted(eb.PRESETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7], help="fractions of the MACs to remove")
    p.add_argument("--finetune-epochs", type=int, nargs="+", default=[2], help="epochs every arm trains from the "
                   "pretrained weights (default a third of the preset's)")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs of the dense pre-training")
    p.add_argument("--max-train", type=int, default=None, help="override the preset's training images")
    p.add_argument("--lr", type=float, default=0.01, help="the learning rate from the pretrained weights")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="one-pass recipe overrides")
    p.add_argument("--scores-from", default="auto", choices=["auto", "constant"], help="the one pass's initial "
                   "gate scores: auto (what the CLI does with --init: ranked within each group by the group's L2 "
                   "magnitude, polarprune_cuda.scores_from_magnitude), or constant (--score-init)")
    p.add_argument("--tag", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--work", default=None, help="folder of the runs (default runs/pretrained-start-<preset>)")
    p.add_argument("--out", type=Path, default=eb.RESULTS)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    preset = dict(eb.PRESETS[args.preset])
    preset.update({k: v for k, v in (("epochs", args.epochs), ("max_train", args.max_train)) if v is not None})
    overrides = eb._parse_set(args.set)
    if args.scores_from == "constant":
        overrides["scores_from"] = "constant"
    name = f"pretrained-start-{args.preset}" + (f"-{args.tag}" if args.tag else "")
    work = Path(args.work or eb.HERE.parents[1] / "runs" / f"pretrained-start-{args.preset}")
    base = {"dataset": preset["dataset"], "batch_size": preset["batch_size"], "max_train": preset["max_train"],
            "data_dir": args.data_dir, "model": "resnet20"}
    rows, pretrained = [], []
    for seed in args.seeds:
        init, acc = _pretrained({**base, "epochs": preset["epochs"], "lr": preset["lr"], "seed": seed}, work,
                                not args.quiet)
        pretrained.append(acc)
        for target in args.targets:
            for epochs in args.finetune_epochs:
                onepass = None
                for arm in args.arms:
                    if arm != "one-pass" and onepass is None:
                        p.error("--arms: the Torch-Pruning arms need one-pass before them (its MACs set theirs)")
                    kw = {**base, "epochs": epochs, "lr": args.lr, "seed": seed, "target_sparsity": target,
                          **(overrides if arm == "one-pass" else {})}
                    target_macs = None if onepass is None else onepass["pruned"]["macs"]
                    # the Torch-Pruning arms do not read the one-pass overrides: one folder for every --tag
                    where = work / (name if arm == "one-pass" else f"pretrained-start-{args.preset}"
                                    + (f"-lr{args.lr:g}" if args.lr != 0.01 else ""))
                    row = run_arm(arm, kw, init, where, not args.quiet, target_macs)
                    onepass = row if arm == "one-pass" else onepass
                    rows.append(row)
                    print(f"seed {seed}, target {target:g}, {epochs} epochs, {arm}: accuracy {row['accuracy']:.4f}, "
                          f"MACs removed {row['sparsity']['macs']:.4f}", flush=True)
    summary = {}
    for target in args.targets:
        for epochs in args.finetune_epochs:
            for arm in args.arms:
                mine = [r for r in rows if r["arm"] == arm and r["target"] == target and r["epochs"] == epochs]
                acc = [r["accuracy"] for r in mine]
                summary[f"{target}|{epochs}|{arm}"] = {
                    "mean": statistics.mean(acc), "sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "per_seed": acc, "macs": statistics.mean(r["sparsity"]["macs"] for r in mine),
                    "params": statistics.mean(r["sparsity"]["params"] for r in mine),
                    "train_seconds": statistics.mean(r["training"]["seconds"] for r in mine)}
    report = {"command": _record.command("pretrained_start.py", argv), "recipe": {**base, "lr": args.lr},
              "pretrain_epochs": preset["epochs"], "pretrained_mean": statistics.mean(pretrained),
              "pretrained_sd": statistics.stdev(pretrained) if len(pretrained) > 1 else 0.0,
              "seeds": args.seeds, "overrides": overrides, "threads": torch.get_num_threads(),
              "summary": summary, "rows": rows}
    _record.write(args.out, name, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
