"""The run drivers: :func:`run_prune` (one-pass channel pruning, then extraction), :func:`run_sparse`
(gradual unstructured pruning), :func:`run_dense` (the dense model), what they return, and :func:`build`
(the recipe's dense model)."""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import data as data_mod
from . import distributed as dist_mod
from . import rundir
from .._io import save_tensors
from ..gates.bank import find_bank
from ..models import build_model
from ..sparse import fggp as fggp_mod
from ..surgery.blocks import depth
from ..surgery import (attach_gates, count, extract, kept_channels, predicted_depth, save_pruned,
                       scores_from_magnitude)
from .checkpoint import Checkpointer
from .config import PruneConfig
from .loop import History, fit_loop, evaluate, training_cost
from .weights import load_init


def load_data(cfg: PruneConfig):
    """The recipe's data set (a folder with its loader options: --image-size, --workers, --normalize)."""
    folder = {} if cfg.dataset != "folder" else {
        "image_size": cfg.image_size, "workers": cfg.workers, "normalize": cfg.normalize,
        "pin_memory": str(cfg.device).startswith("cuda")}
    return data_mod.load_dataset(cfg.dataset, cfg.data_dir, cfg.max_train, cfg.max_test, **folder)


def build(cfg: PruneConfig, data: data_mod.ImageData, notes: dict | None = None) -> nn.Module:
    """The dense model of the recipe (seeded), with ``--init`` weights if given (weights.load_init; what it did
    goes into ``notes["init"]``, for the report)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes, data.in_channels, cfg.small_input)
    if cfg.init:
        note = load_init(model, cfg.init, data.num_classes, cfg.reset_classifier)
        if notes is not None:
            notes["init"] = note
    return model.to(cfg.device)


@dataclass
class PruneResult:
    config: PruneConfig
    data: data_mod.ImageData
    dense_model: nn.Module
    gated_model: nn.Module
    pruned_model: nn.Module
    history: History
    gated_accuracy: float
    pruned_accuracy: float
    finetuned_accuracy: float | None
    baseline: dict | None
    dense_count: dict
    pruned_count: dict
    channels: tuple[int, int]
    seconds: float
    blocks: dict | None = None        # block gates: gated and removed block names, depth dense/pruned/predicted
    training: dict | None = None      # loop.training_cost of the training (and fine-tuning)
    init: dict | None = None          # --init: weights.load_init's account (classifier reset and why)


def run_prune(cfg: PruneConfig, out_dir, *, resume: bool = False, baseline: bool = False,
              progress: bool = True, interrupt_after: int | None = None,
              dist_info: dist_mod.DistInfo = dist_mod.SINGLE) -> PruneResult:
    """Train once with gates, extract, (optionally fine-tune); returns what the report needs.

    With ``cfg.method`` fggp, gmp or annealed: gradual unstructured pruning instead (:func:`run_sparse`).
    Under torchrun (``dist_info`` from :func:`polarprune_cuda.train.distributed.setup`) every rank trains and
    extracts the same model; only rank 0 writes files.
    """
    cfg.validate()
    _check_world(cfg, dist_info)
    if cfg.method != "polar":
        return run_sparse(cfg, out_dir, resume=resume, baseline=baseline, progress=progress,
                          interrupt_after=interrupt_after, dist_info=dist_info)
    with _holding(out_dir, dist_info):
        return _run_prune(cfg, out_dir, resume=resume, baseline=baseline, progress=progress,
                          interrupt_after=interrupt_after, dist_info=dist_info)


def _holding(out_dir, info: dist_mod.DistInfo):
    """The output folder's lock (rundir.py) on the rank that writes files: one run per folder."""
    return rundir.locked(out_dir) if info.is_main else contextlib.nullcontext()


def warn_unreachable(cfg: PruneConfig, n_train: int) -> list[str]:
    """Warnings for a recipe that cannot do what it asks on ``n_train`` images (also emitted with
    :func:`warnings.warn`); returns them."""
    found = []
    steps = data_mod.num_batches(n_train, cfg.batch_size)
    if cfg.batch_size > n_train:
        found.append(f"batch-size {cfg.batch_size} is larger than the training set ({n_train} images): every "
                     "epoch is one step")
    if cfg.method == "polar":
        total = steps * cfg.epochs
        freeze = int(cfg.freeze_fraction() * total)
        warmup, _ = cfg.schedule_epochs()
        warmup_steps = int(round(warmup * steps))
        if cfg.ranked_freeze():
            pass   # --init's default: the pretrained ranking decides at once, as asked
        elif freeze == 0:
            found.append(f"freeze-gates-at {cfg.freeze_fraction():g} of {total} steps freezes the gates at step 0: "
                         "they never train; the budget still meets the target, by the initial scores alone")
        elif warmup_steps >= freeze:
            found.append(f"warmup-epochs {warmup:.3g} reaches past the step where the gates freeze (step {freeze} of "
                         f"{total}, freeze-gates-at {cfg.freeze_fraction():g}): the penalty never acts and the gates "
                         "never train; the budget still meets the target, by the initial scores alone")
    for msg in found:
        warnings.warn(msg, stacklevel=3)
    return found


def _prologue(cfg: PruneConfig, out_dir, resume: bool, progress: bool, info: dist_mod.DistInfo):
    """What both run drivers start with: the keyword sets of fit_loop and evaluate, the folder, the clock, the data
    (with the warnings of a recipe that cannot do what it asks)."""
    fit = dict(resume=resume, progress=progress, dist_info=info)
    ev = dict(device=cfg.device, dist_info=info, amp=cfg.amp, channels_last=cfg.channels_last)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = load_data(cfg)
    if info.is_main:
        warn_unreachable(cfg, len(data.train_y))
    return fit, ev, out, start, data


def _run_prune(cfg: PruneConfig, out_dir, *, resume: bool, baseline: bool, progress: bool,
               interrupt_after: int | None, dist_info: dist_mod.DistInfo) -> PruneResult:
    info = dist_info
    fit, ev, out, start, data = _prologue(cfg, out_dir, resume, progress, info)
    example = data.example_input(1).to(cfg.device)
    notes: dict = {}
    dense = build(cfg, data, notes)
    dense_count = count(dense, example)
    model = build(cfg, data)
    attach_gates(model, example, min_channels=cfg.min_channels, round_to=cfg.round_to, blocks=cfg.blocks,
                 channels=cfg.channel_gates, ste=cfg.ste, init=cfg.score_init)
    if cfg.initial_scores() == "magnitude" and cfg.channel_gates:
        scores_from_magnitude(model)   # the pretrained weights rank the channels before the penalty acts
    history = fit_loop(model, data, cfg, Checkpointer(out / "checkpoint.pt"), gated=True, epochs=cfg.epochs,
                   lr=cfg.lr, label="prune", interrupt_after=interrupt_after, **fit)
    gated_acc = evaluate(model, *data_mod.test_set(data, dist_info), **ev)
    small = extract(model, data.example_input(8).to(cfg.device))
    pruned_acc = evaluate(small, *data_mod.test_set(data, dist_info), **ev)
    finetuned_acc = None
    histories = [history]
    if cfg.finetune_epochs:
        histories.append(fit_loop(small, data, cfg, Checkpointer(out / "finetune.pt"), gated=False,
                              epochs=cfg.finetune_epochs, lr=cfg.lr * 0.1, label="finetune", **fit))
        finetuned_acc = evaluate(small, *data_mod.test_set(data, dist_info), **ev)
    if info.is_main:
        save_pruned(small, out / "model", preprocessing=getattr(data, "preprocessing", None))
    base = None
    if baseline:
        base_hist = fit_loop(dense, data, cfg, Checkpointer(out / "baseline.pt"), gated=False,
                         epochs=cfg.epochs + cfg.finetune_epochs, lr=cfg.lr, label="baseline", **fit)
        base = {"accuracy": evaluate(dense, *data_mod.test_set(data, dist_info), **ev),
                "test_accuracy": base_hist.test_accuracy, "training": training_cost(base_hist)}
    spec = small.polarprune_spec
    kept = sum(len(g["kept"]) for g in spec["groups"])
    total = sum(g["channels"] for g in spec["groups"])
    if cfg.blocks:   # with block gates: channels inside a removed branch go with it (the channels cost model)
        bank = find_bank(model)
        if "channels" not in bank.unavailable:
            cm = bank.cost_model("channels")
            keep = torch.cat(kept_channels(model, warn=False)).float().to(bank.scores.device)
            kept, total = int(round(float(cm.cost(bank.effective(keep))))), int(round(cm.total))
    blocks = None
    if cfg.blocks:
        blocks = {"gated": [b["name"] for b in spec["blocks"]], "removed": list(spec["removed_blocks"]),
                  "depth": {"dense": depth(dense, example), "pruned": depth(small, example),
                            "predicted": predicted_depth(model)}}
    return PruneResult(cfg, data, dense, model, small, history, gated_acc, pruned_acc, finetuned_acc, base,
                       dense_count, count(small, example), (kept, total), time.perf_counter() - start, blocks,
                       training_cost(*histories), notes.get("init"))


def run_dense(cfg: PruneConfig, out_dir, *, resume: bool = True, progress: bool = True,
              dist_info: dist_mod.DistInfo = dist_mod.SINGLE) -> float:
    """Train the dense model with the recipe (no gates, no pruner); returns its test accuracy.

    Checkpoints to ``out_dir/checkpoint.pt`` every epoch and continues from it when ``resume``."""
    cfg.validate()
    out = Path(out_dir)
    data = load_data(cfg)
    model = build(cfg, data)
    with _holding(out, dist_info):
        fit_loop(model, data, cfg, Checkpointer(out / "checkpoint.pt"), gated=False, epochs=cfg.epochs, lr=cfg.lr,
             resume=resume, progress=progress, label="dense", dist_info=dist_info)
    return evaluate(model, *data_mod.test_set(data, dist_info), device=cfg.device, dist_info=dist_info, amp=cfg.amp,
                    channels_last=cfg.channels_last)


def _check_world(cfg: PruneConfig, info: dist_mod.DistInfo) -> None:
    if info.enabled and cfg.cost == "latency":
        raise ValueError("cost latency runs on one process: each rank would time its own tables (run without "
                         "torchrun, or choose --cost macs)")
    if info.enabled and cfg.batch_size < info.world_size:
        raise ValueError(f"batch-size is the global batch and must be at least the number of processes "
                         f"({info.world_size}), got {cfg.batch_size}")


@dataclass
class SparseResult:
    """What a gradual unstructured run (FGGP, GMP, annealed) returns for the report."""

    config: PruneConfig
    data: data_mod.ImageData
    dense_model: nn.Module
    pruned_model: nn.Module          # same architecture, pruned weights exactly zero
    pruner: "fggp_mod.GradualPruner"
    history: History
    pruned_accuracy: float
    baseline: dict | None
    sparsity: dict
    sizes: dict
    seconds: float
    training: dict | None = None     # loop.training_cost of the training


def default_update_every(total_steps: int, end_fraction: float = 0.8) -> int:
    """Mask-update interval near the authors' 50 updates over the schedule (2000 of 100k steps): the divisor of
    ``int(end_fraction * total_steps)`` closest to a 50th of it, so the last update lands on the schedule's
    end and meets the target exactly."""
    end = int(end_fraction * total_steps)
    if end < 1:
        return 1
    ideal = max(1.0, end / 50)
    small = [d for d in range(1, math.isqrt(end) + 1) if end % d == 0]
    divisors = small + [end // d for d in small]
    return min(divisors, key=lambda d: (abs(math.log(d / ideal)), d))


def run_sparse(cfg: PruneConfig, out_dir, *, resume: bool = False, baseline: bool = False,
               progress: bool = True, interrupt_after: int | None = None,
               dist_info: dist_mod.DistInfo = dist_mod.SINGLE) -> SparseResult:
    """Train once while a gradual pruner (FGGP, GMP or annealed) removes weights; save the zeros.

    Under torchrun the gradients the pruner reads are all-reduced, so every rank prunes alike."""
    cfg.validate()
    _check_world(cfg, dist_info)
    with _holding(out_dir, dist_info):
        return _run_sparse(cfg, out_dir, resume=resume, baseline=baseline, progress=progress,
                           interrupt_after=interrupt_after, dist_info=dist_info)


def _run_sparse(cfg: PruneConfig, out_dir, *, resume: bool, baseline: bool, progress: bool,
                interrupt_after: int | None, dist_info: dist_mod.DistInfo) -> SparseResult:
    info = dist_info
    fit, ev, out, start, data = _prologue(cfg, out_dir, resume, progress, info)
    dense = build(cfg, data)
    model = build(cfg, data)
    total = data_mod.num_batches(len(data.train_y), cfg.batch_size) * cfg.epochs
    update_every = cfg.update_every or default_update_every(total)
    kwargs = {"update_every": update_every, "start": cfg.start, "seed": cfg.seed}
    if cfg.method == "fggp":
        kwargs["select_ratio"] = cfg.select_ratio
    pruner = fggp_mod.PRUNERS[cfg.method](model, cfg.target_sparsity, total, **kwargs)
    history = fit_loop(model, data, cfg, Checkpointer(out / "checkpoint.pt"), gated=False, epochs=cfg.epochs,
                   lr=cfg.lr, label=cfg.method, interrupt_after=interrupt_after, pruner=pruner, **fit)
    pruner.remove()
    state = pruner.export()
    sizes = None
    if info.is_main:
        (out / "model").mkdir(exist_ok=True)
        save_tensors(state, out / "model" / "weights.pt")
        sizes = fggp_mod.save_sparse(state, out / "model" / "sparse.pt")
    accuracy = evaluate(model, *data_mod.test_set(data, dist_info), **ev)
    base = None
    if baseline:
        base_hist = fit_loop(dense, data, cfg, Checkpointer(out / "baseline.pt"), gated=False, epochs=cfg.epochs,
                         lr=cfg.lr, label="baseline", **fit)
        base = {"accuracy": evaluate(dense, *data_mod.test_set(data, dist_info), **ev),
                "test_accuracy": base_hist.test_accuracy, "training": training_cost(base_hist)}
    return SparseResult(cfg, data, dense, model, pruner, history, accuracy, base, pruner.sparsity(), sizes,
                        time.perf_counter() - start, training_cost(history))
