"""One-pass pruning: gated training with the polarization penalty, then extraction.

:class:`PruneConfig` holds a recipe; :func:`run_prune` trains once (gates and
weights together, the penalty ramped in), writes an atomic checkpoint after
every epoch (``--resume`` continues from it and ends with the same result),
extracts the hard-gate network, measures it and writes the report.

For people with their own loop, the pieces are public: :func:`make_optimizer`
(a parameter group for the gate scores), :func:`penalty_schedule`,
:func:`evaluate`, and :class:`Checkpointer`.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from . import distributed as dist_mod
from ..sparse import fggp as fggp_mod
from . import rundir
from .._io import save_tensors
from ..gates.modules import find_bank
from ..gates.loss import PolarizationLoss, gate_stats, ramp
from ..models import build_model
from ..surgery.blocks import depth
from .checkpoint import CHECKPOINT_FORMAT, Checkpointer, CheckpointError, Expected
from ..surgery.budget import meet_target
from ..surgery.core import attach_gates, count, extract, kept_channels, predicted_depth, save_pruned

#: polar: one-pass channel pruning with gates; the others: gradual unstructured pruning (fggp.py)
METHODS = ("polar", "fggp", "gmp", "annealed")
TARGET_CONTROLS = ("penalty", "dual")
#: default warm-up and ramp of the penalty, as fractions of the run (see the README's equal-budget section)
WARMUP_FRACTION = 1 / 12
RAMP_FRACTION = 1 / 6


@dataclass
class PruneConfig:
    """A one-pass pruning recipe (the CLI's options)."""

    model: str = "resnet20"
    dataset: str = "digits"
    method: str = "polar"
    target_sparsity: float = 0.5
    cost: str = "macs"
    epochs: int = 40
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    gate_lr: float = 0.1
    target_weight: float = 20.0
    polarization_weight: float = 0.1
    polarization: str = "bimodal"
    # None: a fraction of the run (WARMUP_FRACTION, RAMP_FRACTION), so every run length gets the same recipe
    warmup_epochs: float | None = None
    ramp_epochs: float | None = None
    freeze_gates_at: float = 0.3
    # gate scores: initial value (p = sigmoid(score_init)), straight-through estimator
    score_init: float = 1.0
    ste: str = "identity"
    # how the density follows the target: "penalty" (fixed-weight quadratic term) or "dual" (its target
    # shifted by a multiplier updated by dual ascent every step, so the soft density tracks the target)
    target_control: str = "penalty"
    dual_lr: float = 0.05
    # the weights' learning rate after the gates freeze, as a multiple of the cosine schedule's
    freeze_lr_scale: float = 1.0
    min_channels: int = 4
    round_to: int | None = None
    finetune_epochs: int = 0
    seed: int = 0
    small_input: bool = False
    init: str | None = None
    max_train: int | None = None
    max_test: int | None = None
    data_dir: str | None = None
    device: str = "cpu"
    # block (layer) gates of method polar: one gate per residual branch, with or without channel gates
    blocks: bool = False
    channel_gates: bool = True
    # precision and layout: autocast dtype (None, "bf16", "fp16"; fp16 adds a grad scaler), NHWC activations
    amp: str | None = None
    channels_last: bool = False
    # under torchrun: BatchNorm statistics over the global batch (same result as one process)
    sync_bn: bool = False
    # gradual unstructured methods (method fggp, gmp, annealed)
    update_every: int | None = None
    select_ratio: float = 0.5
    start: str = "dense"

    #: fields that may differ between a run and the checkpoint it resumes from
    RESUME_FREE = ("data_dir", "device")

    def validate(self) -> None:
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive int, got {v!r}")

        for name in ("epochs", "batch_size", "min_channels"):
            positive_int(name)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "polar" and not 0 <= self.target_sparsity < 1:
            raise ValueError(f"target-sparsity must be in [0, 1), got {self.target_sparsity!r}")
        if self.method == "polar" and self.update_every is not None:
            raise ValueError(f"update-every applies to the unstructured methods ({', '.join(METHODS[1:])}), not to "
                             "method polar (its gates move every step)")
        if self.method != "polar":
            if not 0 < self.target_sparsity < 1:
                raise ValueError(f"target-sparsity must be in (0, 1) for method {self.method}, "
                                 f"got {self.target_sparsity!r}")
            if self.update_every is not None:
                positive_int("update_every")
            if self.start not in fggp_mod.STARTS:
                raise ValueError(f"start must be one of {', '.join(fggp_mod.STARTS)}, got {self.start!r}")
            if not 0 < self.select_ratio < 1:
                raise ValueError(f"select-ratio must be in (0, 1), got {self.select_ratio!r}")
            if self.finetune_epochs:
                raise ValueError(f"finetune-epochs applies to method polar only (method {self.method} keeps "
                                 "training the pruned weights to the end of the run)")
        if not self.channel_gates and not self.blocks:
            raise ValueError("blocks-only needs block gates: channel gates off and block gates off leave nothing "
                             "to prune")
        if self.blocks and self.method != "polar":
            raise ValueError(f"blocks applies to method polar only, got method {self.method}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be bf16 or fp16 (or left out for float32), got {self.amp!r}")
        if self.cost not in ("channels", "params", "macs"):
            raise ValueError(f"cost must be channels, params or macs, got {self.cost!r}")
        if self.dataset not in data_mod.DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(data_mod.DATASETS)}, got {self.dataset!r}")
        for name in ("lr", "gate_lr", "target_weight", "polarization_weight", "weight_decay", "momentum",
                     "warmup_epochs", "ramp_epochs", "label_smoothing"):
            v = getattr(self, name)
            if v is None and name in ("warmup_epochs", "ramp_epochs"):
                continue
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name.replace('_', '-')} must be a number >= 0, got {v!r}")
        if self.target_control not in TARGET_CONTROLS:
            raise ValueError(f"target-control must be one of {', '.join(TARGET_CONTROLS)}, got {self.target_control!r}")
        if self.ste not in ("identity", "clipped", "sigmoid"):
            raise ValueError(f"ste must be identity, clipped or sigmoid, got {self.ste!r}")
        for name in ("score_init", "dual_lr", "freeze_lr_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or (name != "score_init" and v < 0):
                raise ValueError(f"{name.replace('_', '-')} must be a finite number"
                                 f"{'' if name == 'score_init' else ' >= 0'}, got {v!r}")
        for name in ("max_train", "max_test", "round_to"):
            if getattr(self, name) is not None:
                positive_int(name)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label-smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        for name in ("model", "init", "data_dir"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, str) and v):
                raise ValueError(f"{name.replace('_', '-')} must be a non-empty string, got {v!r}")
        if not isinstance(self.freeze_gates_at, (int, float)) or not 0 < self.freeze_gates_at <= 1:
            raise ValueError(f"freeze-gates-at must be in (0, 1], got {self.freeze_gates_at!r}")
        if isinstance(self.finetune_epochs, bool) or not isinstance(self.finetune_epochs, int) \
                or self.finetune_epochs < 0:
            raise ValueError(f"finetune-epochs must be >= 0, got {self.finetune_epochs!r}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def schedule_epochs(self, epochs: int | None = None) -> tuple[float, float]:
        """(warm-up, ramp) in epochs for a run of ``epochs`` (default ``self.epochs``): the given values, or the
        default fractions of the run where they are None."""
        epochs = self.epochs if epochs is None else epochs
        warmup = WARMUP_FRACTION * epochs if self.warmup_epochs is None else self.warmup_epochs
        ramp_ = RAMP_FRACTION * epochs if self.ramp_epochs is None else self.ramp_epochs
        return float(warmup), float(ramp_)


# ----------------------------------------------------------------------------- building blocks

def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                   gate_lr: float = 0.1, target_weight: float = 20.0) -> torch.optim.SGD:
    """SGD with two groups: the weights (weight decay, Nesterov) and the gate scores.

    The penalty is a mean over all gates, so the scores' step is scaled by
    their number: ``gate_lr * n_gates / target_weight``; no weight decay on them.
    Block gates take the step they would take in a bank of block gates alone
    (``gate_lr * n_blocks / target_weight``): their gradient is scaled by
    ``n_blocks / n_gates`` (a hook on the scores, installed once). Otherwise a
    block gate, whose task-loss gradient sums over a whole branch, would move
    by as many times more as there are channel gates.
    """
    bank = find_bank(model)
    if bank is not None:
        _scale_block_gradients(bank)
    scores = [bank.scores] if bank is not None else []
    ids = {id(p) for p in scores}
    weights = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    groups = [{"params": weights, "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": momentum > 0}]
    if scores:
        groups.append({"params": scores, "lr": gate_lr * bank.scores.numel() / max(target_weight, 1e-12),
                       "momentum": 0.9, "weight_decay": 0.0})
    return torch.optim.SGD(groups)


def _scale_block_gradients(bank) -> None:
    handle = getattr(bank, "_block_grad_hook", None)
    if handle is not None:
        handle.remove()
        bank._block_grad_hook = None
    blocks = bank.block_segments
    if not blocks or len(blocks) == bank.scores.numel():
        return
    scale = torch.ones_like(bank.scores.detach())
    offsets = bank.offsets
    for b in blocks:
        scale[offsets[b]] = len(blocks) / bank.scores.numel()
    bank._block_grad_hook = bank.scores.register_hook(lambda grad: grad * scale.to(grad.dtype))


def lr_lambdas(total_steps: int, freeze_step: int | None, warmup_steps: int = 0,
               freeze_lr_scale: float = 1.0) -> list[Callable[[int], float]]:
    """Cosine decay for the weights (times ``freeze_lr_scale`` from ``freeze_step`` on); the gate scores move
    only between warm-up and ``freeze_step``."""
    def cosine(step):
        scale = freeze_lr_scale if freeze_step is not None and step >= freeze_step else 1.0
        return scale * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))

    def gates(step):
        return 1.0 if warmup_steps <= step and (freeze_step is None or step < freeze_step) else 0.0

    return [cosine, gates]


def penalty_schedule(steps_per_epoch: int, warmup_epochs: float, ramp_epochs: float):
    """The penalty weight: 0 during warm-up, then a linear ramp to 1 (see :func:`ramp`)."""
    return ramp(int(round(warmup_epochs * steps_per_epoch)), int(round(ramp_epochs * steps_per_epoch)))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
             device="cpu", dist_info: dist_mod.DistInfo = dist_mod.SINGLE, amp: str | None = None,
             channels_last: bool = False) -> float:
    """Top-1 accuracy (eval mode; training mode restored).

    Under torchrun every rank scores its share of the test set and the counts
    are summed over the ranks, so every rank returns the accuracy on all of it.
    """
    was = model.training
    model.eval()
    correct = 0
    if dist_info.enabled:
        part = torch.tensor_split(torch.arange(len(y)), dist_info.world_size)[dist_info.rank]
        x, y_part = x[part], y[part]
    else:
        y_part = y
    try:
        for xb, yb in data_mod.batches(x, y_part, batch_size):
            xb = xb.to(device)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp):
                out = model(xb)
            correct += int((out.argmax(1).cpu() == yb).sum())
    finally:
        model.train(was)
    (correct,) = dist_mod.all_sum(dist_info, [correct], device)
    return correct / max(len(y), 1)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device, amp: str | None):
    """Autocast to ``amp``'s dtype on ``device`` (a no-op context for float32)."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AMP_DTYPES[amp])


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)


# ----------------------------------------------------------------------------- training

@dataclass
class History:
    epoch: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    penalty: list = field(default_factory=list)
    test_accuracy: list = field(default_factory=list)
    density: list = field(default_factory=list)          # hard gates, in the cost unit
    soft_density: list = field(default_factory=list)
    polarized: list = field(default_factory=list)
    histogram: list = field(default_factory=list)        # per epoch: 20-bin histogram of gate probabilities
    epoch_step: list = field(default_factory=list)       # global step at the end of each epoch
    step: list = field(default_factory=list)             # step trace of the density the loss sees
    step_density: list = field(default_factory=list)
    budget: dict = field(default_factory=dict)           # what meet_target chose when the gates froze


def _fit(model: nn.Module, data: data_mod.ImageData, cfg: PruneConfig, ckpt: Checkpointer, *,
         gated: bool, epochs: int, lr: float, resume: bool, progress: bool, label: str,
         interrupt_after: int | None = None, pruner: "fggp_mod.GradualPruner | None" = None,
         dist_info: dist_mod.DistInfo = dist_mod.SINGLE) -> History:
    """Train ``model`` for ``epochs``; gated models add the penalty; a pruner steps after the optimizer.

    Checkpoints every epoch (the pruner's masks included). Under torchrun the
    model is wrapped in DistributedDataParallel, each rank trains on its slice
    of every global batch, metrics are summed over the ranks, and only rank 0
    writes the checkpoint."""
    info = dist_info
    device = torch.device(cfg.device)
    steps_per_epoch = data_mod.num_batches(len(data.train_y), cfg.batch_size)
    total = steps_per_epoch * epochs
    loss_fn = None
    if gated:
        loss_fn = PolarizationLoss(cfg.target_sparsity, cost=cfg.cost, polarization=cfg.polarization,
                                   target_weight=cfg.target_weight, polarization_weight=cfg.polarization_weight,
                                   schedule=penalty_schedule(steps_per_epoch, *cfg.schedule_epochs(epochs)))
        loss_fn.arm(model)
    dual = gated and cfg.target_control == "dual"
    rho, dual_shift = 1.0 - cfg.target_sparsity, 0.0
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, lr, cfg.momentum, cfg.weight_decay, cfg.gate_lr, cfg.target_weight)
    freeze = int(cfg.freeze_gates_at * total) if gated else None
    warmup = int(round(cfg.schedule_epochs(epochs)[0] * steps_per_epoch)) if gated else 0
    lambdas = lr_lambdas(total, freeze, warmup, cfg.freeze_lr_scale)[: len(opt.param_groups)]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    history = History()
    start_epoch = 0
    state = None
    if resume:
        expected = Expected(model=model, optimizer=opt, scheduler=sched, scaler=scaler, pruner=pruner,
                            epochs=epochs, steps_per_epoch=steps_per_epoch, gated=gated,
                            history_fields=tuple(f.name for f in fields(History)))
        state = ckpt.load(cfg.to_dict() | {"_label": label}, PruneConfig().to_dict(), PruneConfig.RESUME_FREE,
                          expected) if info.is_main and ckpt.path.is_file() else None
        state = dist_mod.broadcast_object(info, state)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if loss_fn is not None:
            loss_fn.step = state["loss_step"]
            dual_shift = float(state.get("dual_shift", 0.0))
            if dual:
                loss_fn.target_sparsity = min(1.0, max(0.0, 1.0 - (rho - dual_shift)))
                loss_fn.arm(model)
        if pruner is not None:
            pruner.load_state_dict(state["pruner"])
        history = History(**state["history"])
        start_epoch = state["epoch"]
        torch.set_rng_state(state["rng"])
    train_model = model
    if info.enabled:
        if cfg.sync_bn:
            dist_mod.enable_sync_batchnorm(model)
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    progress = progress and info.is_main
    step = start_epoch * steps_per_epoch
    log_every = max(1, steps_per_epoch // 10)
    epochs_bar = _progress(range(start_epoch, epochs), progress, desc=label, initial=start_epoch, total=epochs,
                           unit="epoch")
    try:
        for epoch in epochs_bar:
            model.train()
            total_loss = total_pen = 0.0
            n_batches = 0
            batch_iter = data_mod.batches(data.train_x, data.train_y, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                          pad=data.pad, flip=data.flip)
            for xb, yb in _progress(batch_iter, progress, total=steps_per_epoch, leave=False, unit="step",
                                    desc=f"epoch {epoch + 1}"):
                if gated and step == freeze:   # the gates stop here: from now on the final architecture
                    history.budget = _meet_target(model, cfg)
                part = dist_mod.shard(len(yb), info)
                if part is None:   # fewer samples than ranks: every rank skips it alike
                    step += 1
                    continue
                share = 1.0
                if info.enabled:   # this rank's slice; DDP averages, so weight by the slice's share
                    share = (part.stop - part.start) * info.world_size / len(yb)
                    xb, yb = xb[part], yb[part]
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                if cfg.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with _autocast(device, cfg.amp):
                    logits = train_model(xb)
                if logits.dtype in (torch.float16, torch.bfloat16):   # autocast: the loss in float32
                    logits = logits.float()
                task = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
                loss = task if share == 1.0 else task * share
                if loss_fn is not None and (freeze is None or step < freeze):
                    penalty = loss_fn(model, step=step)
                    loss = loss + penalty
                    total_pen += penalty.detach().as_subclass(torch.Tensor)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if pruner is not None:
                    pruner.step()
                if dual and loss_fn.last_terms is not None and loss_fn.weights(step)[0] > 0 \
                        and (freeze is None or step < freeze):
                    # dual ascent: the multiplier of the constraint d = rho moves the quadratic term's target
                    dual_shift = min(1.0, max(-1.0, dual_shift + cfg.dual_lr * (float(loss_fn.last_terms[0]) - rho)))
                    loss_fn.target_sparsity = min(1.0, max(0.0, 1.0 - (rho - dual_shift)))
                    loss_fn.arm(model)   # the next forward pass computes the terms for the moved target
                sched.step()
                total_loss += task.detach() * (share / info.world_size)
                n_batches += 1
                if loss_fn is not None and step % log_every == 0 and loss_fn.last_terms is not None \
                        and (freeze is None or step < freeze):   # the density this step's penalty saw
                    history.step.append(step)
                    history.step_density.append(float(loss_fn.last_terms[0]))
                step += 1
            if info.enabled:
                _sync_buffers(model)   # rank 0's BatchNorm statistics everywhere before evaluating
                bank = find_bank(model)
                if bank is not None:
                    dist_mod.check_identical(info, bank.scores, "gate scores")
            total_loss, = dist_mod.all_sum(info, [float(total_loss)], device)
            history.epoch.append(epoch + 1)
            history.epoch_step.append(step)
            history.train_loss.append(total_loss / max(n_batches, 1))
            history.penalty.append(float(total_pen) / max(n_batches, 1))
            history.test_accuracy.append(evaluate(model, data.test_x, data.test_y, device=device, dist_info=info,
                                                  amp=cfg.amp, channels_last=cfg.channels_last))
            if gated:
                stats = gate_stats(model, cost=cfg.cost)
                history.density.append(stats["density"])
                history.soft_density.append(stats["soft_density"])
                history.polarized.append(stats["polarized"])
                bank = find_bank(model)
                p = bank.probabilities().float().cpu()
                history.histogram.append(torch.histc(p, bins=20, min=0, max=1).tolist())
                if progress:
                    epochs_bar.set_postfix(acc=f"{history.test_accuracy[-1]:.3f}",
                                           density=f"{stats['density']:.3f}", polarized=f"{stats['polarized']:.2f}")
            elif pruner is not None:
                sp = pruner.sparsity()["sparsity"]
                history.density.append(1 - sp)
                if progress:
                    epochs_bar.set_postfix(acc=f"{history.test_accuracy[-1]:.3f}", sparsity=f"{sp:.3f}")
            elif progress:
                epochs_bar.set_postfix(acc=f"{history.test_accuracy[-1]:.3f}")
            if info.is_main:
                ckpt.save({
                    "format": CHECKPOINT_FORMAT,
                    "config": cfg.to_dict() | {"_label": label},
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "loss_step": loss_fn.step if loss_fn is not None else 0,
                    "dual_shift": dual_shift,
                    "pruner": pruner.state_dict() if pruner is not None else None,
                    "history": asdict(history),
                    "rng": torch.get_rng_state(),
                    "world_size": info.world_size,
                })
            dist_mod.barrier(info)
            if interrupt_after is not None and epoch + 1 >= interrupt_after:
                raise KeyboardInterrupt
        if gated and freeze >= total:   # the gates trained to the end: meet the target now
            history.budget = _meet_target(model, cfg)
    finally:
        if info.enabled:
            dist_mod.disable_sync_batchnorm(model)
    return history


def _meet_target(model: nn.Module, cfg: PruneConfig) -> dict:
    """The exact budget when the gates freeze (budget.py): the hard gates become the set that meets the target."""
    result = meet_target(model, cfg.target_sparsity, cfg.cost)
    return result.to_dict()


def _sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def build(cfg: PruneConfig, data: data_mod.ImageData) -> nn.Module:
    """The dense model of the recipe (seeded), with ``--init`` weights if given."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes, data.in_channels, cfg.small_input)
    if cfg.init:
        try:
            state = torch.load(cfg.init, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"init: cannot read weights from {cfg.init!r} ({type(exc).__name__}: {exc})") from exc
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise ValueError(f"init: {cfg.init!r} must hold a state_dict (names to tensors), got "
                             f"{type(state).__name__}")
        own = model.state_dict()
        for key, value in state.items():
            if key in own and value.shape != own[key].shape:
                raise ValueError(f"init: {cfg.init!r} does not fit {cfg.model}: {key} has shape "
                                 f"{tuple(value.shape)}, the model's is {tuple(own[key].shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"init: {cfg.init!r}: {key} holds NaN or inf")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"init: {cfg.init!r} does not fit {cfg.model} (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
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
        freeze = int(cfg.freeze_gates_at * total)
        warmup, _ = cfg.schedule_epochs()
        warmup_steps = int(round(warmup * steps))
        if freeze == 0:
            found.append(f"freeze-gates-at {cfg.freeze_gates_at:g} of {total} steps freezes the gates at step 0: "
                         "they never train; the budget still meets the target, by the initial scores alone")
        elif warmup_steps >= freeze:
            found.append(f"warmup-epochs {warmup:.3g} reaches past the step where the gates freeze (step {freeze} of "
                         f"{total}, freeze-gates-at {cfg.freeze_gates_at:g}): the penalty never acts and the gates "
                         "never train; the budget still meets the target, by the initial scores alone")
    for msg in found:
        warnings.warn(msg, stacklevel=3)
    return found


def _run_prune(cfg: PruneConfig, out_dir, *, resume: bool, baseline: bool, progress: bool,
               interrupt_after: int | None, dist_info: dist_mod.DistInfo) -> PruneResult:
    info = dist_info
    fit = dict(resume=resume, progress=progress, dist_info=info)
    ev = dict(device=cfg.device, dist_info=info, amp=cfg.amp, channels_last=cfg.channels_last)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = data_mod.load_dataset(cfg.dataset, cfg.data_dir, cfg.max_train, cfg.max_test)
    if info.is_main:
        warn_unreachable(cfg, len(data.train_y))
    example = data.example_input(1).to(cfg.device)
    dense = build(cfg, data)
    dense_count = count(dense, example)
    model = build(cfg, data)
    attach_gates(model, example, min_channels=cfg.min_channels, round_to=cfg.round_to, blocks=cfg.blocks,
                 channels=cfg.channel_gates, ste=cfg.ste, init=cfg.score_init)
    history = _fit(model, data, cfg, Checkpointer(out / "checkpoint.pt"), gated=True, epochs=cfg.epochs,
                   lr=cfg.lr, label="prune", interrupt_after=interrupt_after, **fit)
    gated_acc = evaluate(model, data.test_x, data.test_y, **ev)
    small = extract(model, data.example_input(8).to(cfg.device))
    pruned_acc = evaluate(small, data.test_x, data.test_y, **ev)
    finetuned_acc = None
    if cfg.finetune_epochs:
        _fit(small, data, cfg, Checkpointer(out / "finetune.pt"), gated=False, epochs=cfg.finetune_epochs,
             lr=cfg.lr * 0.1, label="finetune", **fit)
        finetuned_acc = evaluate(small, data.test_x, data.test_y, **ev)
    if info.is_main:
        save_pruned(small, out / "model")
    base = None
    if baseline:
        base_hist = _fit(dense, data, cfg, Checkpointer(out / "baseline.pt"), gated=False,
                         epochs=cfg.epochs + cfg.finetune_epochs, lr=cfg.lr, label="baseline", **fit)
        base = {"accuracy": evaluate(dense, data.test_x, data.test_y, **ev),
                "test_accuracy": base_hist.test_accuracy}
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
                       dense_count, count(small, example), (kept, total), time.perf_counter() - start, blocks)


def run_dense(cfg: PruneConfig, out_dir, *, resume: bool = True, progress: bool = True,
              dist_info: dist_mod.DistInfo = dist_mod.SINGLE) -> float:
    """Train the dense model with the recipe (no gates, no pruner); returns its test accuracy.

    Checkpoints to ``out_dir/checkpoint.pt`` every epoch and continues from it when ``resume``."""
    cfg.validate()
    out = Path(out_dir)
    data = data_mod.load_dataset(cfg.dataset, cfg.data_dir, cfg.max_train, cfg.max_test)
    model = build(cfg, data)
    with _holding(out, dist_info):
        _fit(model, data, cfg, Checkpointer(out / "checkpoint.pt"), gated=False, epochs=cfg.epochs, lr=cfg.lr,
             resume=resume, progress=progress, label="dense", dist_info=dist_info)
    return evaluate(model, data.test_x, data.test_y, device=cfg.device, dist_info=dist_info, amp=cfg.amp,
                    channels_last=cfg.channels_last)


def _check_world(cfg: PruneConfig, info: dist_mod.DistInfo) -> None:
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
    fit = dict(resume=resume, progress=progress, dist_info=info)
    ev = dict(device=cfg.device, dist_info=info, amp=cfg.amp, channels_last=cfg.channels_last)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = data_mod.load_dataset(cfg.dataset, cfg.data_dir, cfg.max_train, cfg.max_test)
    if info.is_main:
        warn_unreachable(cfg, len(data.train_y))
    dense = build(cfg, data)
    model = build(cfg, data)
    total = data_mod.num_batches(len(data.train_y), cfg.batch_size) * cfg.epochs
    update_every = cfg.update_every or default_update_every(total)
    kwargs = {"update_every": update_every, "start": cfg.start, "seed": cfg.seed}
    if cfg.method == "fggp":
        kwargs["select_ratio"] = cfg.select_ratio
    pruner = fggp_mod.METHODS[cfg.method](model, cfg.target_sparsity, total, **kwargs)
    history = _fit(model, data, cfg, Checkpointer(out / "checkpoint.pt"), gated=False, epochs=cfg.epochs,
                   lr=cfg.lr, label=cfg.method, interrupt_after=interrupt_after, pruner=pruner, **fit)
    pruner.remove()
    state = pruner.export()
    sizes = None
    if info.is_main:
        (out / "model").mkdir(exist_ok=True)
        save_tensors(state, out / "model" / "weights.pt")
        sizes = fggp_mod.save_sparse(state, out / "model" / "sparse.pt")
    accuracy = evaluate(model, data.test_x, data.test_y, **ev)
    base = None
    if baseline:
        base_hist = _fit(dense, data, cfg, Checkpointer(out / "baseline.pt"), gated=False, epochs=cfg.epochs,
                         lr=cfg.lr, label="baseline", **fit)
        base = {"accuracy": evaluate(dense, data.test_x, data.test_y, **ev),
                "test_accuracy": base_hist.test_accuracy}
    return SparseResult(cfg, data, dense, model, pruner, history, accuracy, base, pruner.sparsity(), sizes,
                        time.perf_counter() - start)
