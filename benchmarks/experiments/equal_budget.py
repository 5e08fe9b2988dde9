"""Equal training budget: one pass against dense, train-prune-finetune and the small net from scratch.

    .venv/bin/python benchmarks/experiments/equal_budget.py --preset digits            # digits, ResNet-20 (CPU: minutes)
    .venv/bin/python benchmarks/experiments/equal_budget.py --preset fashion-12k       # Fashion-MNIST, 12,000 images, 6 epochs
    .venv/bin/python benchmarks/experiments/equal_budget.py --preset fashion-12k --set warmup_epochs=1 --tag lever-warmup1

Four arms, every one with the same data, augmentation, batch, cosine
schedule, seeds and total epochs:

- ``dense``: the unpruned network (the trainer's recipe, no gates);
- ``one-pass``: this library, gates and weights trained once
  (:func:`polarprune_cuda.train.run_prune`), then the extracted network;
- ``train-prune-finetune``: Torch-Pruning's own pipeline: the dense network
  trained for ``pretrain_fraction`` of the epochs (default two thirds),
  pruned once with ``tp.pruner.MetaPruner`` and group-magnitude (L2)
  importance, every group by one ratio, that ratio bisected so the MACs
  removed equal the one-pass model's of the same seed, then fine-tuned for the
  rest of the epochs at ``lr * finetune_lr_scale`` (default 0.1);
- ``from-scratch``: the train-prune-finetune architecture (uniform widths), re-initialised
  and trained for all the epochs;
- ``learned-from-scratch``: the one pass's extracted architecture (learned, non-uniform widths) of the same
  seed, re-initialised and trained for all the epochs: does the learned architecture beat the uniform one at
  the same MACs?

``--equal-macs``: the two from-scratch arms get as many epochs as their MACs allow within the dense run's
training MACs (``floor(epochs * dense MACs / their MACs)``), beside the other arms at equal epochs.

Each arm of each seed is its own job under --work with its result in a JSON
file, so an interrupted comparison resumes where it stopped. Results:
benchmarks/results/equal-budget-<preset>[-<tag>].json and .md: per arm and
seed the test accuracy, params and MACs removed and training wall time, and
per arm mean and spread (sample standard deviation) over the seeds.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _record  # noqa: E402

RESULTS = HERE.parent / "results"

PRESETS = {
    # full digits set (1,437 train / 360 test images, 8x8), 30 epochs
    "digits": {"dataset": "digits", "epochs": 30, "batch_size": 64, "lr": 0.1, "max_train": None},
    # the setting: 12,000 training images, the full 10,000 test images, 6 epochs
    "fashion-12k": {"dataset": "fashion-mnist", "epochs": 6, "batch_size": 128, "lr": 0.1, "max_train": 12000},
    # the full training set, 15 epochs (hours on a CPU)
    "fashion": {"dataset": "fashion-mnist", "epochs": 15, "batch_size": 128, "lr": 0.1, "max_train": None},
}
ARMS = ("dense", "one-pass", "train-prune-finetune", "from-scratch", "learned-from-scratch")
SCRATCH = ("from-scratch", "learned-from-scratch")
#: PruneConfig fields only gated training reads
GATE_FIELDS = {"scores_from", "gate_lr", "target_weight", "polarization_weight", "polarization", "warmup_epochs",
               "ramp_epochs",
               "freeze_gates_at", "score_init", "ste", "target_control", "dual_lr", "freeze_lr_scale",
               "min_channels", "round_to", "blocks", "channel_gates", "finetune_epochs", "keep_gated", "shrink_every"}


def _parse_set(items: list[str]) -> dict:
    """``key=value`` recipe overrides (PruneConfig fields), values parsed as JSON where they parse."""
    from polarprune_cuda.train import PruneConfig

    fields = PruneConfig().to_dict()
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set expects FIELD=VALUE with FIELD a PruneConfig field, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _sparsity(dense: dict, small: dict) -> dict:
    return {k: 1 - small[k] / dense[k] for k in ("params", "macs")}


def _tp_prune(model, example, target_macs: float, ignored, steps: int = 30, global_pruning: bool = False):
    """Torch-Pruning, one shot: MetaPruner with group L2 magnitude, every group by one ratio (``global_pruning``:
    one threshold over all groups); the ratio is bisected so the pruned MACs come as close to ``target_macs`` as
    the channel granularity allows."""
    import torch_pruning as tp
    from polarprune_cuda.surgery.costs import count

    def pruned(ratio):
        m = copy.deepcopy(model)
        names = {n for n, _ in model.named_modules()}
        ign = [m.get_submodule(n) for n in ignored if n in names]
        pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=ign, global_pruning=global_pruning)
        pruner.step()
        return m, count(m, example)["macs"]

    lo, hi = 0.0, 0.95
    best = (abs(count(model, example)["macs"] - target_macs), 0.0, copy.deepcopy(model))
    for _ in range(steps):
        mid = (lo + hi) / 2
        m, macs = pruned(mid)
        if abs(macs - target_macs) < best[0]:
            best = (abs(macs - target_macs), mid, m)
        if macs > target_macs:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4:
            break
    return best[2], best[1]


def _reinit(model, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    for m in model.modules():   # PyTorch's defaults, then the CIFAR ResNets' own init, as a fresh build does
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)


def _cached(arm: str, cfg, done: Path) -> dict | None:
    """The result an earlier run of this arm wrote, refused if it was written with other settings."""
    if not done.is_file():
        return None
    row = json.loads(done.read_text())
    saved, now = dict(row.get("config") or {}), cfg.to_dict()
    # an unset freeze is its default: rows written when the default was a number compare by that number
    now["freeze_gates_at"] = cfg.freeze_fraction()
    if saved.get("freeze_gates_at", 0) is None:
        saved["freeze_gates_at"] = type(cfg)(init=saved.get("init")).freeze_fraction()
    # arms without gates do not read the gate recipe: a new gate default does not invalidate them; an option
    # added since the row was written, at its default, does not either
    ignore = set() if arm == "one-pass" else GATE_FIELDS
    defaults = type(cfg)().to_dict()
    changed = sorted(k for k in now if k not in ignore and saved.get(k, object()) != now[k]
                     and not (k not in saved and now[k] == defaults[k]))
    if changed:
        raise SystemExit(f"{done} was written with other settings ({', '.join(changed)}); delete it or use "
                         "another --work")
    return row


def _one_pass(cfg, out: Path, row: dict, progress: bool) -> dict:
    from polarprune_cuda import train

    result = train.run_prune(cfg, out / "run", resume=True, progress=progress)
    row.update(training=result.training, accuracy=result.pruned_accuracy, gated_accuracy=result.gated_accuracy,
               budget=result.history.budget,
               density_curve=result.history.density, soft_density_curve=result.history.soft_density,
               channels=list(result.channels))
    return result.pruned_count


def _tp_arm(arm: str, cfg, data, example, work: Path, out: Path, row: dict, progress: bool, target_macs: float,
            pretrain_fraction: float, finetune_lr_scale: float, dense_macs: float | None = None) -> dict:
    """Torch-Pruning train-prune-finetune, or (from-scratch) the architecture it prunes to, trained anew."""
    import torch
    from polarprune_cuda.surgery.costs import count
    from polarprune_cuda.train import loop, runs
    from polarprune_cuda import train

    ev = dict(device=cfg.device)
    pre_epochs = max(1, round(pretrain_fraction * cfg.epochs))
    ft_epochs = cfg.epochs - pre_epochs
    pre_ckpt = work / f"train-prune-finetune-seed{cfg.seed}" / "pretrain.pt"
    model = runs.build(cfg, data)
    histories = []
    if arm == "train-prune-finetune":
        histories.append(loop.fit_loop(model, data, cfg, train.Checkpointer(pre_ckpt), gated=False, epochs=pre_epochs,
                                   lr=cfg.lr, resume=True, progress=progress, label="pretrain"))
        row["pretrained_accuracy"] = train.evaluate(model, data.test_x, data.test_y, **ev)
    else:   # the same pruned architecture: the same pruning of the same pre-trained weights (deterministic)
        if not pre_ckpt.is_file():
            raise SystemExit(f"arm {arm} needs {pre_ckpt} (run arm train-prune-finetune of seed {cfg.seed} first)")
        model.load_state_dict(torch.load(pre_ckpt, map_location=cfg.device, weights_only=True)["model"])
    model.eval()
    small, ratio = _tp_prune(model, example, target_macs, ignored=["fc", "linear", "classifier"])
    small.train()
    row["pruning_ratio"] = ratio
    if arm == "train-prune-finetune":
        if ft_epochs:
            histories.append(loop.fit_loop(small, data, cfg, train.Checkpointer(out / "finetune.pt"), gated=False,
                                       epochs=ft_epochs, lr=cfg.lr * finetune_lr_scale, resume=True,
                                       progress=progress, label="finetune"))
        row["split"] = [pre_epochs, ft_epochs]
    else:   # from-scratch: that architecture, fresh weights (the models' own init), all the epochs (or, with
        # dense_macs, as many as the dense run's training MACs pay for)
        _reinit(small, cfg.seed)
        epochs = _scratch_epochs(cfg.epochs, dense_macs or 0.0, count(small, example)["macs"], dense_macs is not None)
        row["epochs"] = epochs
        histories.append(loop.fit_loop(small, data, cfg, train.Checkpointer(out / "scratch.pt"), gated=False,
                                   epochs=epochs, lr=cfg.lr, resume=True, progress=progress, label="scratch"))
    row["training"] = loop.training_cost(*histories)   # from-scratch: its own training (not the pre-training)
    row["accuracy"] = train.evaluate(small, data.test_x, data.test_y, **ev)
    return count(small, example)


def prepare(arm: str, cfg, out: Path) -> tuple:
    """(the result an earlier run of this arm wrote, or None; then the data, one example input and the dense
    network's counts, for an arm still to run in ``out``)."""
    from polarprune_cuda.surgery.costs import count
    from polarprune_cuda.train import data as data_mod, runs

    cached = _cached(arm, cfg, out / "result.json")
    if cached is not None:
        return cached, None, None, None
    out.mkdir(parents=True, exist_ok=True)
    data = data_mod.load_dataset(cfg.dataset, cfg.data_dir, cfg.max_train, cfg.max_test)
    example = data.example_input(1).to(cfg.device)
    return None, data, example, count(runs.build(cfg, data), example)


def _learned_arm(cfg, data, example, work: Path, out: Path, row: dict, progress: bool, dense_macs: float,
                 equal_macs: bool) -> dict:
    """The one pass's extracted architecture of this seed (its saved spec), fresh weights, trained densely."""
    from polarprune_cuda.surgery.costs import count
    from polarprune_cuda.surgery.spec import load_pruned
    from polarprune_cuda.train import loop, runs
    from polarprune_cuda import train

    folder = work / f"one-pass-seed{cfg.seed}" / "run" / "model"
    if not folder.is_dir():
        raise SystemExit(f"arm learned-from-scratch needs {folder} (run arm one-pass of seed {cfg.seed} first)")
    small = load_pruned(folder, lambda: runs.build(cfg, data)).to(cfg.device)
    _reinit(small, cfg.seed)
    epochs = _scratch_epochs(cfg.epochs, dense_macs, count(small, example)["macs"], equal_macs)
    history = loop.fit_loop(small, data, cfg, train.Checkpointer(out / "scratch.pt"), gated=False, epochs=epochs,
                        lr=cfg.lr, resume=True, progress=progress, label="scratch")
    row["epochs"], row["training"] = epochs, loop.training_cost(history)
    row["accuracy"] = train.evaluate(small, data.test_x, data.test_y, device=cfg.device)
    return count(small, example)


def _scratch_epochs(epochs: int, dense_macs: float, small_macs: float, equal_macs: bool) -> int:
    """A from-scratch arm's epochs: the run's, or (``equal_macs``) as many as the dense run's MACs pay for."""
    return int(epochs * dense_macs // small_macs) if equal_macs else epochs


def run_arm(arm: str, cfg_kwargs: dict, work: Path, progress: bool, pretrain_fraction: float,
            finetune_lr_scale: float, onepass: dict | None, equal_macs: bool = False) -> dict:
    from polarprune_cuda import train

    cfg = train.PruneConfig(**cfg_kwargs)
    equal_macs = equal_macs and arm in SCRATCH
    out = work / f"{arm}{'-equal-macs' if equal_macs else ''}-seed{cfg.seed}"
    cached, data, example, dense_count = prepare(arm, cfg, out)
    if cached is not None:
        return cached
    start = time.perf_counter()
    row: dict = {"arm": arm, "seed": cfg.seed}
    if arm == "dense":
        row["accuracy"] = train.run_dense(cfg, out / "run", resume=True, progress=progress)
        row["training"] = _checkpoint_cost(out / "run" / "checkpoint.pt")
        small_count = dense_count
    elif arm == "one-pass":
        small_count = _one_pass(cfg, out, row, progress)
    elif arm == "learned-from-scratch":
        small_count = _learned_arm(cfg, data, example, work, out, row, progress, dense_count["macs"], equal_macs)
    else:
        if onepass is None:
            raise SystemExit(f"arm {arm} needs the one-pass result of seed {cfg.seed} (its MACs set the budget)")
        target_macs = dense_count["macs"] * (1 - onepass["sparsity"]["macs"])
        small_count = _tp_arm(arm, cfg, data, example, work, out, row, progress, target_macs, pretrain_fraction,
                              finetune_lr_scale, dense_count["macs"] if equal_macs else None)
    row["seconds"] = time.perf_counter() - start
    row["dense"], row["pruned"] = dense_count, small_count
    row["sparsity"] = _sparsity(dense_count, small_count)
    row["equal_macs"] = equal_macs
    row["config"] = cfg.to_dict()
    (out / "result.json").write_text(json.dumps(row, indent=1))
    return row


def _checkpoint_cost(path: Path) -> dict:
    """The training cost (loop.training_cost) of the finished run whose last checkpoint is ``path``."""
    import torch
    from polarprune_cuda.train import loop

    history = torch.load(path, map_location="cpu", weights_only=True)["history"]
    return loop.training_cost(loop.History(**history))


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows: list[dict], arms: list[str]) -> dict:
    out = {}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        acc = _mean_sd([r["accuracy"] for r in mine])
        out[arm] = {"seeds": [r["seed"] for r in mine], "accuracy_mean": acc[0], "accuracy_sd": acc[1],
                    "macs_removed_mean": statistics.mean(r["sparsity"]["macs"] for r in mine),
                    "params_removed_mean": statistics.mean(r["sparsity"]["params"] for r in mine),
                    "seconds_mean": statistics.mean(r["seconds"] for r in mine)}
        if all(r.get("training") for r in mine):   # results written before the training cost was recorded lack it
            out[arm]["train_seconds_mean"] = statistics.mean(r["training"]["seconds"] for r in mine)
            out[arm]["train_macs_mean"] = statistics.mean(r["training"]["macs"] for r in mine)
    return out


def markdown(report: dict) -> str:
    rows, arms, summary = report["rows"], report["arms"], report["summary"]
    seeds = sorted({r["seed"] for r in rows})
    rc = report["recipe"]
    lines = [f"# Equal budget: {rc['model']} on {rc['dataset']}"
             + (f" ({rc['max_train']:,} training images)" if rc.get("max_train") else ""),
             "",
             f"{rc['epochs']} epochs for every arm, batch {rc['batch_size']}, lr {rc['lr']} (cosine), target "
             f"{100 * rc['target_sparsity']:.0f}% of {rc['cost']}; train-prune-finetune splits the epochs "
             f"{report['pretrain_fraction']:.2f} / {1 - report['pretrain_fraction']:.2f} and fine-tunes at lr x "
             f"{report['finetune_lr_scale']}. Accuracy on the full test set; MACs and params removed from "
             "the extracted network.",
             "",
             "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | MACs removed | params removed "
             "| train time | training steps' time | training MACs |",
             "|---|" + "---:|" * (len(seeds) + 6)]
    for arm in arms:
        if arm not in summary:
            continue
        cells = []
        for s in seeds:
            r = next((r for r in rows if r["arm"] == arm and r["seed"] == s), None)
            cells.append("-" if r is None else f"{100 * r['accuracy']:.2f}%")
        sm = summary[arm]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {100 * sm['accuracy_mean']:.2f} ± "
                     f"{100 * sm['accuracy_sd']:.2f} | {100 * sm['macs_removed_mean']:.1f}% | "
                     f"{100 * sm['params_removed_mean']:.1f}% | {sm['seconds_mean']:.0f} s | "
                     + (f"{sm['train_seconds_mean']:.0f} s | {sm['train_macs_mean']:.3g} |"
                        if "train_macs_mean" in sm else "- | - |"))
    scratch = [r for r in rows if r.get("equal_macs")]
    if scratch:
        lines += ["", "Equal training MACs (`--equal-macs`): the from-scratch arms trained as many epochs as their "
                  "MACs allow within the dense run's: " + "; ".join(
                      f"{arm} {', '.join(str(r['epochs']) for r in scratch if r['arm'] == arm)}"
                      for arm in SCRATCH if any(r["arm"] == arm for r in scratch)) + " epochs (per seed)."]
    if report.get("overrides"):
        lines += ["", "Recipe overrides: " + ", ".join(f"`{k}={v}`" for k, v in report["overrides"].items())]
    lines += ["", f"Machine: {report['machine']['cpu']}, {report['machine']['threads']} threads; train time is "
              "wall time of the arm's training on that machine (side by side in one script, one arm at a time), "
              "evaluation included; the training steps' time and the training MACs (forward and backward, 3x the "
              "forward's) count the training steps only. One-pass trains the extracted network from the freeze "
              "on; from-scratch counts its own training, not the pre-training that found its architecture.",
              "", "```", report["command"], "```", ""]
    return "\n".join(lines)


README = HERE.parents[1] / "docs" / "results.md"   # the page holding the equal-budget table
START, END = "<!-- equal-budget:start -->", "<!-- equal-budget:end -->"


def readme_table(paths: list[Path]) -> str:
    """One row per arm of each result file: the README's equal-budget table."""
    lines = ["| setting | arm | accuracy mean ± sd (seeds) | MACs removed | params removed | train time | "
             "training MACs |", "|---|---|---:|---:|---:|---:|---:|"]
    for path in paths:
        report = json.loads(path.read_text())
        rc = report["recipe"]
        size = f" {rc['max_train'] // 1000}k" if rc.get("max_train") else ""
        setting = f"{rc['dataset']}{size}, {rc['epochs']} ep, `{path.stem}`"
        for arm in report["arms"]:
            sm = report["summary"].get(arm)
            if sm is None:
                continue
            lines.append(f"| {setting} | {arm} | {100 * sm['accuracy_mean']:.2f} ± {100 * sm['accuracy_sd']:.2f} "
                         f"({len(sm['seeds'])}) | {100 * sm['macs_removed_mean']:.1f}% | "
                         f"{100 * sm['params_removed_mean']:.1f}% | {sm['seconds_mean']:.0f} s | "
                         + (f"{sm['train_macs_mean']:.3g} |" if "train_macs_mean" in sm else "- |"))
    return "\n".join(lines)


def update_readme(paths: list[Path], readme: Path = README) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + START + "\n" + readme_table(paths) + "\n" + END + tail)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", nargs="*", default=None, metavar="RESULT",
                        help="only rewrite the equal-budget table of docs/results.md from these result files (stems under "
                             "benchmarks/results, e.g. equal-budget-digits) and exit")
    parser.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--target-sparsity", type=float, default=0.5)
    parser.add_argument("--cost", default="macs", choices=("channels", "params", "macs"))
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    parser.add_argument("--max-train", type=int, default=None, help="override the preset's training images")
    parser.add_argument("--pretrain-fraction", type=float, default=2 / 3)
    parser.add_argument("--finetune-lr-scale", type=float, default=0.1)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="one-pass recipe overrides (PruneConfig fields), e.g. warmup_epochs=1")
    parser.add_argument("--tag", default=None, help="suffix of the result files (e.g. a lever being measured)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default=None, help="where every arm trains (default: the recipe's, cpu)")
    parser.add_argument("--results", default=str(RESULTS), help="folder the result files are written to")
    parser.add_argument("--merge", nargs="+", default=None, metavar="RESULT",
                        help="write one result of these results' rows (seeds run as separate processes; named by "
                             "the first one's preset and --tag), measuring nothing")
    parser.add_argument("--work", default=None, help="folder of the runs (default runs/equal-budget-<preset>[-tag])")
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--equal-macs", action="store_true", help="the from-scratch arms train as many epochs as "
                        "their MACs allow within the dense run's training MACs (not the run's epochs)")
    return parser


def _run_arms(args, common: dict, overrides: dict, work: Path) -> list[dict]:
    """Every asked-for arm of every seed, in ARMS order (the Torch-Pruning arms read the one-pass MACs)."""
    rows = []
    for seed in args.seeds:
        onepass = None
        for arm in ARMS:
            if arm not in args.arms:
                continue
            kwargs = common | {"seed": seed} | (overrides if arm == "one-pass" else {})
            if arm in ("train-prune-finetune", "from-scratch", "learned-from-scratch") and onepass is None:
                path = work / f"one-pass-seed{seed}" / "result.json"
                onepass = json.loads(path.read_text()) if path.is_file() else None
            row = run_arm(arm, kwargs, work, not args.quiet, args.pretrain_fraction, args.finetune_lr_scale, onepass,
                          args.equal_macs)
            if arm == "one-pass":
                onepass = row
            rows.append(row)
            print(f"seed {seed} {arm}: accuracy {100 * row['accuracy']:.2f}%, MACs removed "
                  f"{100 * row['sparsity']['macs']:.1f}%, {row['seconds']:.0f} s", file=sys.stderr)
    return rows


def merge(paths: list[Path]) -> dict:
    """One report of the rows of several (the same recipe, other seeds): the first one's fields, every row, the
    commands of all."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    first = reports[0]
    for other, path in zip(reports[1:], paths[1:]):
        if other["recipe"] | {"seed": None} != first["recipe"] | {"seed": None} or other["arms"] != first["arms"]:
            raise SystemExit(f"--merge: {path} has another recipe or other arms than {paths[0]}")
    rows = [r for rep in reports for r in rep["rows"]]
    merged = first | {"command": " ; ".join(rep["command"] for rep in reports), "rows": rows,
                      "recipe": first["recipe"] | {"seed": sorted({r["seed"] for r in rows})}}
    merged["summary"] = summarise(rows, merged["arms"])
    return merged


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    if args.merge is not None:
        missing = [p for p in args.merge if not Path(p).is_file()]
        if missing:
            raise SystemExit(f"--merge needs existing result files, missing: {missing}")
        report = merge([Path(p) for p in args.merge])
        stem = f"equal-budget-{args.preset}" + (f"-{args.tag}" if args.tag else "")
        _record.write(Path(args.results), stem, report, markdown(report))
        return report
    if args.readme is not None:
        paths = [RESULTS / (stem if stem.endswith(".json") else stem + ".json") for stem in args.readme]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing or not paths:
            raise SystemExit(f"--readme needs existing result files, missing: {missing or 'none given'}")
        update_readme(paths)
        return {}
    if not 0 < args.pretrain_fraction <= 1:
        raise SystemExit(f"--pretrain-fraction must be in (0, 1], got {args.pretrain_fraction}")
    import torch
    from polarprune_cuda.train.report import versions

    preset = dict(PRESETS[args.preset])
    if args.epochs:
        preset["epochs"] = args.epochs
    if args.max_train:
        preset["max_train"] = args.max_train
    overrides = _parse_set(args.set)
    stem = f"equal-budget-{args.preset}" + (f"-{args.tag}" if args.tag else "")
    work = Path(args.work or f"runs/{stem}")
    common = dict(model=args.model, target_sparsity=args.target_sparsity, cost=args.cost,
                  data_dir=args.data_dir, **preset, **({"device": args.device} if args.device else {}))
    rows = _run_arms(args, common, overrides, work)
    report = {
        "command": _record.command("equal_budget.py", argv),
        "recipe": common | {"seed": args.seeds},
        "overrides": overrides,
        "pretrain_fraction": args.pretrain_fraction,
        "finetune_lr_scale": args.finetune_lr_scale,
        "arms": [a for a in ARMS if a in args.arms],
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    **({"gpu": torch.cuda.get_device_name(torch.device(args.device))}
                       if args.device and args.device.startswith("cuda") else {})},
        "versions": versions(),
        "rows": rows,
    }
    report["summary"] = summarise(rows, report["arms"])
    if args.no_write:
        print(markdown(report))
    else:
        _record.write(Path(args.results), stem, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
