"""The training loop: :func:`fit_loop` (one training run of a model, checkpointed every epoch), :func:`evaluate`,
:class:`History`, and the autocast and progress-bar helpers.

``fit_loop`` is cut into its steps, in the order they run: :func:`_setup` (optimizer, schedule and, gated, the
recipe), :func:`_restore` (a checkpoint), :func:`_train_epoch` with :func:`_train_step` (one epoch's batches)
and :func:`_recipe_step`, :func:`_end_epoch` (history, gate statistics) and :func:`_checkpoint_state` (what is
saved). The state they share lives in one :class:`_Fit`.

The one-pass recipe itself (the penalty and its ramp, the gate window, the freeze with the exact target, the
switch to the extracted network with the optimizer's state carried) is :class:`~polarprune_cuda.OnePass`, the
object users add to their own loops; the CLI is one of its users and adds what a managed run needs around it:
epochs and checkpoints, DDP, dual target control, ``--shrink-every``, the history and the report.
"""
from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from . import distributed as dist_mod
from . import energy as energy_mod
from . import switch as switch_mod
from ..gates.loss import PolarizationLoss, gate_stats
from ..gates.bank import find_bank
from ..sparse import fggp as fggp_mod
from ..surgery import shrink as shrink_mod
from ..surgery.extract import guard
from ..surgery.budget import budget_disagreement, budget_now
from ..surgery.costs import count
from ..surgery.spec import spec_digest
from ..errors import CheckpointError
from .checkpoint import CHECKPOINT_FORMAT, HISTOGRAM_BINS, Checkpointer, Expected
from .config import AMP_MODES, PruneConfig
from .onepass import OnePass
from .optim import lr_lambdas, make_optimizer


@torch.no_grad()
def evaluate(model: nn.Module, x, y: torch.Tensor | None = None, batch_size: int = 256,
             device="cpu", dist_info: dist_mod.DistInfo = dist_mod.SINGLE, amp: str | None = None,
             channels_last: bool = False) -> float:
    """Top-1 accuracy (eval mode; training mode restored) of ``model`` on tensors ``x``, ``y``, or on ``x`` alone
    as an iterable of ``(inputs, labels)`` batches (a ``DataLoader``).

    Under torchrun every rank scores its share of the test set (tensors: its slice; a loader: whatever its
    sampler gives the rank) and the counts are summed over the ranks, so every rank returns the accuracy on all
    of it.
    """
    if y is None and isinstance(x, torch.Tensor):
        raise TypeError("evaluate takes tensors x and y, or an iterable of (inputs, labels) batches as x alone "
                        "(a DataLoader); got a tensor x without y")
    was = model.training
    model.eval()
    correct = total = 0
    if y is None:
        loader = x
    elif dist_info.enabled:
        part = torch.tensor_split(torch.arange(len(y)), dist_info.world_size)[dist_info.rank]
        loader = data_mod.batches(x[part], y[part], batch_size)
    else:
        loader = data_mod.batches(x, y, batch_size)
    try:
        for xb, yb in loader:
            xb = xb.to(device)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp):
                out = model(xb)
            correct += int((out.argmax(1).cpu() == yb.cpu()).sum())
            total += len(yb)
    finally:
        model.train(was)
    correct, total = dist_mod.all_sum(dist_info, [correct, total], device)
    return correct / max(total, 1)


#: the autocast dtype of each --amp mode
AMP_DTYPES = dict(zip(AMP_MODES, (torch.bfloat16, torch.float16)))


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
    # the training's cost (report.json "training"): wall time of the steps, MACs computed (forward and
    # backward, TRAIN_MACS_FACTOR times the forward's), energy where a counter is readable, per epoch
    epoch_seconds: list = field(default_factory=list)
    epoch_macs: list = field(default_factory=list)
    epoch_joules: list = field(default_factory=list)     # empty where no counter is readable
    macs_trace: list = field(default_factory=list)       # [step, forward MACs per sample] where the network changes
    switch_step: list = field(default_factory=list)      # [the step where training moved to the extracted network]
    shrinks: list = field(default_factory=list)          # [step, gates removed] of each shrink (--shrink-every)
    energy: dict = field(default_factory=dict)           # {"source": ...} or {"reason": ...} (energy.open_counter)


#: History's wall-clock measurements: the only fields that differ between two runs of one recipe on one machine
CLOCK_FIELDS = ("epoch_seconds", "epoch_joules")

#: training MACs per forward MAC: the forward pass, and the backward pass's gradients of the inputs and of the
#: weights, each as many multiply-accumulates as the forward (the first layer's input gradient included)
TRAIN_MACS_FACTOR = 3


def training_cost(*histories: History) -> dict:
    """What the training of one or more runs in sequence (training, fine-tuning) cost: wall time of the steps
    (seconds), MACs computed (forward and backward), energy (joules; None unless a counter was read for every
    epoch of every run) and where the energy comes from."""
    epochs = sum(len(h.epoch_seconds) for h in histories)
    joules = [j for h in histories for j in h.epoch_joules]
    energy = next((h.energy for h in histories if h.energy), {})
    return {"seconds": sum(x for h in histories for x in h.epoch_seconds),
            "macs": sum(x for h in histories for x in h.epoch_macs),
            "joules": sum(joules) if joules and len(joules) == epochs else None,
            "energy": energy.get("source") or energy.get("reason"), "epochs": epochs,
            "switch_step": next((h.switch_step[0] for h in histories if h.switch_step), None)}


@dataclass
class _Fit:
    """What the steps of one :func:`fit_loop` share: built by :func:`_setup`, moved by the others."""

    model: nn.Module
    train_model: nn.Module                 # the model, or its DistributedDataParallel wrapper
    loss_fn: PolarizationLoss | None
    opt: torch.optim.SGD
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    history: History
    pruner: "fggp_mod.GradualPruner | None"
    gated: bool
    dual: bool
    rho: float                             # the target density 1 - target_sparsity
    dual_shift: float
    freeze: int | None                     # the step where the gates freeze (None: no gates)
    total: int
    steps_per_epoch: int
    step: int = 0
    start_epoch: int = 0
    example: torch.Tensor | None = None    # one sample: MACs are counted and the extraction checked on it
    macs_per_sample: int = 0               # forward MACs of one sample through the network being trained
    switch_at: int | None = None           # the step where training moves to the extracted network (None: never)
    gated_model: nn.Module | None = None   # after the switch: the gated model (gates frozen, weights left behind)
    maps: dict | None = None               # after the switch: index_maps of the gated model
    counter: object = None                 # energy.EnergyCounter, None where none is readable
    origin: nn.Module | None = None        # the caller's gated model: the trained weights go back into it at the end
    to_origin: dict | None = None          # after a shrink: index maps from the shrunk gated model to ``origin``'s
    streak: torch.Tensor | None = None     # --shrink-every: per gate, the epoch ends in a row it was closed
    recipe: OnePass | None = None          # gated: the one-pass recipe (penalty, freeze, exact target, switch)


def fit_loop(model: nn.Module, data: data_mod.ImageData, cfg: PruneConfig, ckpt: Checkpointer, *,
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
    run = _setup(model, data, cfg, gated=gated, epochs=epochs, lr=lr, pruner=pruner, device=device,
                 progress=progress and info.is_main)
    if resume:
        _restore(run, ckpt, cfg, label, epochs, info)
    _wrap(run, cfg, info, device)
    _follow(run, cfg, info, device)   # a recipe that froze when it was built (freeze step 0)
    progress = progress and info.is_main
    run.step = run.start_epoch * run.steps_per_epoch
    epochs_bar = _progress(range(run.start_epoch, epochs), progress, desc=label, initial=run.start_epoch,
                           total=epochs, unit="epoch")
    try:
        for epoch in epochs_bar:
            sums = _train_epoch(run, data, cfg, epoch, progress, info, device)
            _end_epoch(run, data, cfg, epoch, sums, epochs_bar if progress else None, info, device)
            if run.streak is not None:
                _maybe_shrink(run, cfg, info, device)
            if info.is_main:
                ckpt.save(_checkpoint_state(run, cfg, label, epoch, info))
            dist_mod.barrier(info)
            if interrupt_after is not None and epoch + 1 >= interrupt_after:
                raise KeyboardInterrupt
        if gated and not run.history.budget:   # the gates trained to the end: meet the target now
            run.recipe._freeze()
            _follow(run, cfg, info, device)
    finally:
        if info.enabled:
            dist_mod.disable_sync_batchnorm(run.model)
            dist_mod.disable_sync_batchnorm(model)
    _give_back(run)
    return run.history


def _give_back(run: _Fit) -> None:
    """The trained weights and statistics, and the gate scores, back into the caller's (gated) model, which then
    computes what the network trained last (extracted or shrunk) does."""
    maps = run.maps if run.gated_model is not None else None
    if run.to_origin is not None:
        maps = switch_mod.compose(run.to_origin, maps) if maps is not None else run.to_origin
    if maps is None:
        return
    switch_mod.write_back(run.model, run.origin, maps)
    gated = run.gated_model or run.model
    with torch.no_grad():
        find_bank(run.origin).scores.copy_(find_bank(gated).scores)


def _maybe_shrink(run: _Fit, cfg: PruneConfig, info: dist_mod.DistInfo, device: torch.device) -> None:
    """--shrink-every N, at the end of an epoch while the gates move: remove the channels of the gates closed at
    the end of each of the last N epochs (shrink.py), as far as every group keeps its guard channels and the
    target stays reachable; weights, momentum buffers and the schedule carry over as at the switch."""
    if run.gated_model is not None or run.step >= run.freeze:
        return
    bank = find_bank(run.model)
    closed = (bank.scores.detach() <= 0).cpu()
    run.streak = torch.where(closed, run.streak + 1, torch.zeros_like(run.streak))
    removed = shrink_mod.removed_gates(run.model)
    chosen = _shrinkable(run.model, cfg, (run.streak >= cfg.shrink_every) & ~removed, removed)
    if not bool(chosen.any()):
        return
    if info.enabled:
        dist_mod.disable_sync_batchnorm(run.model)
    with switch_mod.KeptRng():
        new, maps = shrink_mod.remove_gates(run.model, chosen)
    opt, sched = switch_mod.carry_optimizer(run.model, run.opt, run.sched, new, maps)
    new_bank = find_bank(new)
    buf = opt.state.get(new_bank.scores, {}).get("momentum_buffer")
    if buf is not None:   # a pinned gate does not move
        buf[shrink_mod.removed_gates(new).to(buf.device)] = 0
    run.to_origin = switch_mod.compose(run.to_origin, maps)
    run.model, run.opt, run.sched = new, opt, sched
    if run.recipe is not None:
        run.recipe._adopt(new, new, opt, sched)
    if cfg.channels_last:
        new.to(memory_format=torch.channels_last)
    _wrap(run, cfg, info, device)
    if run.loss_fn is not None:
        run.loss_fn.arm(new)
    run.macs_per_sample = count(new, run.example)["macs"]
    run.history.macs_trace.append([run.step, run.macs_per_sample])
    run.history.shrinks.append([run.step, int(chosen.sum())])


def _shrinkable(model: nn.Module, cfg: PruneConfig, candidates: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The candidates that can go: every group keeps at least its guard's gates, and with every other gate
    open the cost still reaches the target's budget (so meet_target can meet it); the most closed go first."""
    bank = find_bank(model)
    record = bank.surgery
    scores = bank.scores.detach().double().cpu()
    chosen = torch.zeros_like(candidates)
    for rec, offset in zip(record.groups, bank.offsets):
        seg = slice(offset, offset + rec.size)
        need = guard(rec, record.min_channels, record.round_to)[0]
        room = int((~removed[seg]).sum()) - need
        cand = torch.nonzero(candidates[seg]).flatten()
        if room > 0 and cand.numel():
            pick = cand[torch.argsort(scores[seg][cand], stable=True)][:room]
            chosen[offset + pick] = True
    cm = bank.exact_cost(cfg.cost)
    budget = (1.0 - cfg.target_sparsity) * cm.total

    def reach(k: int) -> bool:   # the cost with every gate open but the removed ones and the k most closed chosen
        gone = removed.clone()
        gone[order[:k]] = True
        g = (~gone).to(bank.scores.device, torch.float32)
        return cm.cost(bank.effective(g)) >= budget * (1 + 1e-6)

    order = torch.nonzero(chosen).flatten()
    order = order[torch.argsort(scores[order], stable=True)]
    lo, hi = 0, order.numel()
    while lo < hi:   # the longest prefix (most closed first) that keeps the target reachable
        mid = (lo + hi + 1) // 2
        if reach(mid):
            lo = mid
        else:
            hi = mid - 1
    out = torch.zeros_like(candidates)
    out[order[:lo]] = True
    return out


def _wrap(run: _Fit, cfg: PruneConfig, info: dist_mod.DistInfo, device: torch.device) -> None:
    """Under torchrun: the network being trained in DistributedDataParallel (synchronised BatchNorm with
    --sync-bn); else the network itself."""
    run.train_model = run.model
    if info.enabled:
        if cfg.sync_bn:
            dist_mod.enable_sync_batchnorm(run.model)
        run.train_model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None)


def _recipe_step(run: _Fit, cfg: PruneConfig, info: dist_mod.DistInfo, device: torch.device) -> None:
    """The recipe's step after the optimizer's (OnePass.step: the gate window, the freeze with the exact target,
    the switch), then :func:`_follow`. Under torchrun the wrapper is rebuilt when the scores start or stop
    training, so that DistributedDataParallel averages exactly the gradients there are."""
    rec = run.recipe
    if rec is None:
        return
    if info.enabled and rec.switch_enabled and rec.steps + 1 == rec.freeze_step:
        dist_mod.disable_sync_batchnorm(run.model)   # the extraction copies plain BatchNorm layers
    moving = rec.bank.scores.requires_grad
    rec.step()
    _follow(run, cfg, info, device)
    if info.enabled and not rec.switched and rec.bank.scores.requires_grad != moving:
        _wrap(run, cfg, info, device)


def _follow(run: _Fit, cfg: PruneConfig, info: dist_mod.DistInfo, device: torch.device) -> None:
    """What the recipe did, in the run: the budget met at the freeze (history), and from the switch on the
    extracted network trained (the weights, momentum buffers, learning rates and schedule carried by OnePass;
    the gated model stays, gates frozen, for the statistics and the end)."""
    rec = run.recipe
    if rec is None:
        return
    if rec.budget is not None and not run.history.budget:
        run.history.budget = dict(rec.budget)
    if rec.switched and run.gated_model is None:
        run.gated_model, run.maps, run.model = rec.gated, rec.maps, rec.network
        if cfg.channels_last:
            run.model.to(memory_format=torch.channels_last)
        _wrap(run, cfg, info, device)
        run.macs_per_sample = count(run.model, run.example)["macs"]
        run.history.macs_trace.append([run.step, run.macs_per_sample])
        run.history.switch_step = [run.step]


def _setup(model: nn.Module, data: data_mod.ImageData, cfg: PruneConfig, *, gated: bool, epochs: int, lr: float,
           pruner, device: torch.device, progress: bool = False) -> _Fit:
    """The optimizer, the learning-rate schedule, the grad scaler and, gated, the recipe (:class:`OnePass`: the
    penalty armed on the model, the freeze, the exact target, the switch)."""
    steps_per_epoch = data_mod.num_batches(len(data.train_y), cfg.batch_size)
    total = steps_per_epoch * epochs
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, lr, cfg.momentum, cfg.weight_decay, cfg.gate_lr, cfg.target_weight)
    freeze = int(cfg.freeze_fraction() * total) if gated else None
    warmup = int(round(cfg.schedule_epochs(epochs)[0] * steps_per_epoch)) if gated else 0
    lambdas = lr_lambdas(total, freeze, warmup, cfg.freeze_lr_scale)[: len(opt.param_groups)]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    example = data.example_input(1).to(device)
    switch_at = freeze if gated and not cfg.keep_gated and freeze < total else None
    recipe = loss_fn = None
    if gated:
        recipe = OnePass(model, example, cfg.target_sparsity, total, opt, sched, cost=cfg.cost,
                         freeze_at=cfg.freeze_fraction(), warmup_steps=warmup, switch=switch_at is not None,
                         ramp_steps=int(round(cfg.schedule_epochs(epochs)[1] * steps_per_epoch)),
                         target_weight=cfg.target_weight, polarization_weight=cfg.polarization_weight,
                         polarization=cfg.polarization, check_group=False, hold_scores=False,
                         restart_schedule=False,   # the CLI's SGD schedule runs on (--freeze-lr-scale)
                         ranked_freeze=cfg.ranked_freeze(),
                         latency_inputs=data.example_input(cfg.latency_batch).to(device)
                         if cfg.cost == "latency" else None, latency_progress=progress)
        recipe.advice = "train longer (--epochs), freeze later (--freeze-gates-at) or raise --gate-lr"
        loss_fn = recipe.loss
    counter, source = energy_mod.open_counter(device)
    history = History(energy={"source": source} if counter is not None else {"reason": source})
    macs = count(model, example)["macs"]
    history.macs_trace.append([0, macs])
    return _Fit(recipe=recipe, model=model, train_model=model, loss_fn=loss_fn, opt=opt, sched=sched, scaler=scaler,
                history=history, pruner=pruner, gated=gated, dual=gated and cfg.target_control == "dual",
                rho=1.0 - cfg.target_sparsity, dual_shift=0.0, freeze=freeze, total=total,
                steps_per_epoch=steps_per_epoch, example=example, macs_per_sample=macs, switch_at=switch_at,
                counter=counter, origin=model,
                streak=torch.zeros(find_bank(model).scores.numel(), dtype=torch.long)
                if gated and cfg.shrink_every else None)


def _restore(run: _Fit, ckpt: Checkpointer, cfg: PruneConfig, label: str, epochs: int,
             info: dist_mod.DistInfo) -> None:
    """Continue from ``ckpt`` where it exists (rank 0 reads and checks it, every rank gets it): the model,
    optimizer, schedule, scaler, loss and pruner state, the history, the epoch and the RNG state."""
    expected = Expected(model=run.model, optimizer=run.opt, scheduler=run.sched, scaler=run.scaler,
                        pruner=run.pruner, epochs=epochs, steps_per_epoch=run.steps_per_epoch, gated=run.gated,
                        saved=_saved(run, cfg, label, info),
                        switch=_rebuilder(run, cfg) if run.switch_at is not None else None,
                        shrink=_shrunk(run) if run.streak is not None else None)
    state = ckpt.load(cfg.to_dict() | {"_label": label}, PruneConfig().to_dict(), PruneConfig.RESUME_FREE,
                      expected) if info.is_main and ckpt.path.is_file() else None
    state = dist_mod.broadcast_object(info, state)
    if state is None:
        return
    if state.get("shrink") is not None:
        run.streak = state["shrink"]["streak"].clone()
        if bool(state["shrink"]["removed"].any()):
            if expected.shrunk is None:   # the other ranks: rebuild what rank 0 checked
                expected.shrunk = expected.shrink(state["shrink"]["removed"])
            sh = expected.shrunk
            run.to_origin, run.model, run.opt, run.sched = sh.maps, sh.model, sh.optimizer, sh.scheduler
            run.macs_per_sample = count(run.model, run.example)["macs"]
            if run.loss_fn is not None:   # as the shrink did: the fused penalty from the first step on
                run.loss_fn.arm(run.model)
    switched = "spec" in state
    if switched and expected.built is None:   # the other ranks: rebuild what rank 0 checked
        expected.built = expected.switch(run.model, state["gated_model"], state["spec"])
    run.model.load_state_dict(state["gated_model"] if switched else state["model"])
    if switched:
        sw = expected.built
        run.gated_model, run.maps = run.model, sw.maps
        run.model, run.opt, run.sched = sw.model, sw.optimizer, sw.scheduler
        run.model.load_state_dict(state["model"])
        run.macs_per_sample = count(run.model, run.example)["macs"]
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    if run.loss_fn is not None:
        run.loss_fn.step = state["loss_step"]
        run.dual_shift = float(state.get("dual_shift", 0.0))
        if run.dual:
            run.loss_fn.target_sparsity = min(1.0, max(0.0, 1.0 - (run.rho - run.dual_shift)))
            run.loss_fn.arm(run.gated_model or run.model)
    if run.pruner is not None:
        run.pruner.load_state_dict(state["pruner"])
    run.history = History(**state["history"])
    _check_budget(run, cfg, ckpt, shrunk=state.get("shrink") is not None and bool(state["shrink"]["removed"].any()))
    run.start_epoch = state["epoch"]
    torch.set_rng_state(state["rng"])
    if run.recipe is not None:   # the recipe at the checkpoint's step, on the networks restored
        rec = run.recipe
        rec._adopt(run.gated_model or run.model, run.model, run.opt, run.sched, run.maps)
        rec.steps = run.start_epoch * run.steps_per_epoch
        rec.budget = dict(run.history.budget) if run.history.budget else None
        rec._gates_move(rec._moving(rec.steps))


def _check_budget(run: _Fit, cfg: PruneConfig, ckpt: Checkpointer, shrunk: bool) -> None:
    """A restored budget is the run's target and cost, and what the restored gates give (a budget edited into
    a checkpoint would go into report.json); after a shrink removed gates, the target and cost only."""
    budget = run.history.budget
    if not budget:
        return
    why = None
    if budget["target_sparsity"] != cfg.target_sparsity or budget["cost"] != cfg.cost:
        why = (f"is for target {budget['target_sparsity']} of {budget['cost']!r}, the run's is "
               f"{cfg.target_sparsity} of {cfg.cost!r}")
    elif not shrunk:
        why = budget_disagreement(run.gated_model or run.model, budget)
        if why is not None and cfg.cost == "latency":
            # a measured cost: tables timed again (another machine, a cache measured anew) give the same gates
            # other figures; the run goes on with them, and says so
            run.history.budget = budget_now(run.gated_model or run.model, budget)
            warnings.warn(f"checkpoint {ckpt.path}: the latency tables measured now give the run's gates other "
                          f"figures than the checkpoint's ({why}); the budget is recomputed from them: predicted "
                          f"{100 * run.history.budget['achieved_sparsity']:.1f}% of the latency removed (target "
                          f"{100 * budget['target_sparsity']:.1f}%)")
            why = None
    if why is not None:
        raise CheckpointError(f"checkpoint {ckpt.path}: field history.budget {why}; delete it or use another --out")


def _saved(run: _Fit, cfg: PruneConfig, label: str, info: dist_mod.DistInfo):
    """What this run, as built, would save with the given objects in it (Expected.saved: a checkpoint is compared
    with it): :func:`_checkpoint_state` itself, on a copy of the run holding them."""
    def saved(*, model, optimizer, scheduler, scaler, pruner, gated_model=None) -> dict:
        now = replace(run, model=model, opt=optimizer, sched=scheduler, scaler=scaler, pruner=pruner,
                      gated_model=gated_model)
        return _checkpoint_state(now, cfg, label, -1, info)   # its "epoch" (0) is not compared: a rule checks it

    return saved


def _rebuilder(run: _Fit, cfg: PruneConfig):
    """What a checkpoint written after the switch is checked and restored with: the extraction of a copy of the
    gated model holding the checkpoint's gated weights, its spec equal to the checkpoint's."""
    def rebuild(base: nn.Module, gated_state: dict, spec: dict) -> switch_mod.Switched:
        gated = copy.deepcopy(base)
        gated.load_state_dict(gated_state)
        sw = switch_mod.switch(gated, run.opt, run.sched, run.example, channels_last=cfg.channels_last)
        if spec_digest(sw.model.polarprune_spec) != spec_digest(spec):
            raise ValueError("it is not the extraction of the checkpoint's gated model")
        return sw

    return rebuild


def _shrunk(run: _Fit):
    """What a checkpoint of a run that shrank is checked and restored with: the gated model without the channels
    of the checkpoint's removed gates (the removal is the same whether it happened at once or in steps)."""
    def rebuild(removed: torch.Tensor) -> switch_mod.Switched:
        base = copy.deepcopy(run.model)
        new, maps = shrink_mod.remove_gates(base, removed)
        opt, sched = switch_mod.carry_optimizer(base, run.opt, run.sched, new, maps)
        return switch_mod.Switched(new, opt, sched, maps)

    return rebuild


def _train_epoch(run: _Fit, data: data_mod.ImageData, cfg: PruneConfig, epoch: int, progress: bool,
                 info: dist_mod.DistInfo, device: torch.device) -> tuple:
    """One epoch's batches; returns (sum of the task loss, sum of the penalty, batches trained)."""
    run.model.train()
    total_loss = total_pen = 0.0
    n_batches = macs = 0
    start, joules = time.perf_counter(), run.counter.read() if run.counter is not None else None
    log_every = max(1, run.steps_per_epoch // 10)
    batch_iter = data_mod.train_batches(data, cfg.batch_size, cfg.seed, epoch, info)
    for batch in _progress(batch_iter, progress, total=run.steps_per_epoch, leave=False, unit="step",
                           desc=f"epoch {epoch + 1}"):
        xb, yb = batch[:2]
        whole = batch[2] if len(batch) == 3 else len(yb)   # a folder's batches come as this rank's part
        part = dist_mod.shard(whole, info)
        if part is None:   # fewer samples than ranks: every rank skips it alike
            run.step += 1
            _recipe_step(run, cfg, info, device)
            continue
        task, penalty, share = _train_step(run, xb, yb, part, cfg, info, device, whole, len(batch) == 3)
        macs += TRAIN_MACS_FACTOR * run.macs_per_sample * len(yb)
        if penalty is not None:
            total_pen += penalty
        total_loss += task.detach() * (share / info.world_size)
        n_batches += 1
        loss_fn = run.loss_fn
        if loss_fn is not None and run.step % log_every == 0 and loss_fn.last_terms is not None \
                and (run.freeze is None or run.step < run.freeze):   # the density this step's penalty saw
            run.history.step.append(run.step)
            run.history.step_density.append(float(loss_fn.last_terms[0]))
        run.step += 1
        _recipe_step(run, cfg, info, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    run.history.epoch_seconds.append(time.perf_counter() - start)
    run.history.epoch_macs.append(macs)
    if joules is not None:
        run.history.epoch_joules.append(run.counter.delta(joules, run.counter.read()))
    return total_loss, total_pen, n_batches


def _train_step(run: _Fit, xb: torch.Tensor, yb: torch.Tensor, part: slice, cfg: PruneConfig,
                info: dist_mod.DistInfo, device: torch.device, whole: int | None = None,
                sliced: bool = False) -> tuple:
    """One optimizer step on this rank's slice of a batch of ``whole`` samples (``sliced``: ``xb`` is the slice
    already) (then the pruner, the dual ascent, the schedule); returns (task loss, penalty or None, the slice's
    share of the batch)."""
    share = 1.0
    if info.enabled:   # this rank's slice; DDP averages, so weight by the slice's share
        share = (part.stop - part.start) * info.world_size / (whole or len(yb))
        if not sliced:
            xb, yb = xb[part], yb[part]
    xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
    if cfg.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    with _autocast(device, cfg.amp):
        logits = run.train_model(xb)
    if logits.dtype in (torch.float16, torch.bfloat16):   # autocast: the loss in float32
        logits = logits.float()
    task = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
    loss = task if share == 1.0 else task * share
    loss_fn, step = run.loss_fn, run.step
    gates_move = run.freeze is None or step < run.freeze
    pen = None
    if loss_fn is not None and gates_move:
        penalty = loss_fn(run.model, step=step)
        loss = loss + penalty
        pen = penalty.detach().as_subclass(torch.Tensor)
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.opt)
    run.scaler.update()
    if run.pruner is not None:
        run.pruner.step()
    if run.dual and loss_fn.last_terms is not None and loss_fn.weights(step)[0] > 0 and gates_move:
        # dual ascent: the multiplier of the constraint d = rho moves the quadratic term's target
        run.dual_shift = min(1.0, max(-1.0, run.dual_shift + cfg.dual_lr * (float(loss_fn.last_terms[0]) - run.rho)))
        loss_fn.target_sparsity = min(1.0, max(0.0, 1.0 - (run.rho - run.dual_shift)))
        loss_fn.arm(run.model)   # the next forward pass computes the terms for the moved target
    run.sched.step()
    return task, pen, share


def _end_epoch(run: _Fit, data: data_mod.ImageData, cfg: PruneConfig, epoch: int, sums: tuple, bar,
               info: dist_mod.DistInfo, device: torch.device) -> None:
    """The epoch's history: losses summed over the ranks, test accuracy, gate or pruner statistics
    (``bar``: the epochs' progress bar, None without one)."""
    total_loss, total_pen, n_batches = sums
    model, history = run.model, run.history
    gated = run.gated_model or model   # after the switch the gates live in the gated model, frozen
    if info.enabled:
        _sync_buffers(model)   # rank 0's BatchNorm statistics everywhere before evaluating
        bank = find_bank(gated)
        if bank is not None:
            dist_mod.check_identical(info, bank.scores, "gate scores")
    total_loss, = dist_mod.all_sum(info, [float(total_loss)], device)
    history.epoch.append(epoch + 1)
    history.epoch_step.append(run.step)
    history.train_loss.append(total_loss / max(n_batches, 1))
    history.penalty.append(float(total_pen) / max(n_batches, 1))
    history.test_accuracy.append(evaluate(model, *data_mod.test_set(data, info), device=device, dist_info=info,
                                          amp=cfg.amp, channels_last=cfg.channels_last))
    acc = f"{history.test_accuracy[-1]:.3f}"
    if run.gated:
        stats = gate_stats(gated, cost=cfg.cost)
        history.density.append(stats["density"])
        history.soft_density.append(stats["soft_density"])
        history.polarized.append(stats["polarized"])
        p = find_bank(gated).probabilities().float().cpu()
        history.histogram.append(torch.histc(p, bins=HISTOGRAM_BINS, min=0, max=1).tolist())
        if bar is not None:
            bar.set_postfix(acc=acc, density=f"{stats['density']:.3f}", polarized=f"{stats['polarized']:.2f}")
    elif run.pruner is not None:
        sp = run.pruner.sparsity()["sparsity"]
        history.density.append(1 - sp)
        if bar is not None:
            bar.set_postfix(acc=acc, sparsity=f"{sp:.3f}")
    elif bar is not None:
        bar.set_postfix(acc=acc)


def _checkpoint_state(run: _Fit, cfg: PruneConfig, label: str, epoch: int, info: dist_mod.DistInfo) -> dict:
    """What the checkpoint after ``epoch`` holds; a checkpoint read back is compared with what it gives for the
    resuming run (:func:`_saved`, checkpoint_schema.py)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict() | {"_label": label},
        "epoch": epoch + 1,
        "model": run.model.state_dict(),
        **({} if run.streak is None else {"shrink": {
            "streak": run.streak.clone(), "removed": shrink_mod.removed_gates(run.gated_model or run.model)}}),
        **({} if run.gated_model is None else {"gated_model": run.gated_model.state_dict(),
                                               "spec": json.loads(json.dumps(run.model.polarprune_spec))}),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "loss_step": run.loss_fn.step if run.loss_fn is not None else 0,
        "dual_shift": run.dual_shift,
        "pruner": run.pruner.state_dict() if run.pruner is not None else None,
        "history": asdict(run.history),
        "rng": torch.get_rng_state(),
        "world_size": info.world_size,
    }


def _sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf, src=0)
