"""The schema of a training checkpoint: :func:`validate` checks a checkpoint's contents against the run
(a :class:`~polarprune_cuda.train.checkpoint.Expected`) before anything is restored.

Every failure is a :class:`CheckpointError` naming the file and the field. The constants say what a
checkpoint holds; :mod:`~polarprune_cuda.train.checkpoint` re-exports them with :func:`validate`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .._io import content_digest
from ..errors import CheckpointError

CHECKPOINT_FORMAT = 1
#: the top-level entries of a checkpoint (what train.loop.fit_loop saves), in the order they are checked
FIELDS = ("format", "config", "epoch", "model", "optimizer", "scheduler", "scaler", "loss_step", "dual_shift",
          "pruner", "history", "rng", "world_size")
#: a checkpoint written after the switch to the extracted network also holds the gated model's state
#: ("gated_model"; its "model" is then the extracted network's) and the extraction's spec
SWITCH_FIELDS = ("gated_model", "spec")
#: a checkpoint of a run with --shrink-every also holds "shrink": {"streak", "removed"}, one entry per gate
SHRINK_FIELD = "shrink"
#: the fields of trainer.History (the trainer can pass its own through Expected.history_fields)
HISTORY_FIELDS = ("epoch", "train_loss", "penalty", "test_accuracy", "density", "soft_density", "polarized",
                  "histogram", "epoch_step", "step", "step_density", "budget")
#: History's training-cost fields, absent from checkpoints written before they existed
COST_FIELDS = ("epoch_seconds", "epoch_macs", "epoch_joules", "macs_trace", "switch_step", "energy", "shrinks")
#: the entries of budget.BudgetResult.to_dict (history["budget"] once the gates froze)
BUDGET_FIELDS = ("target_sparsity", "achieved_sparsity", "cost", "budget", "achieved_cost", "total", "opened",
                 "closed", "reason")
HISTOGRAM_BINS = 20


class _Invalid(Exception):
    """One field is wrong: ``at`` is its path in the checkpoint, ``why`` what is wrong with it."""

    def __init__(self, at: tuple, why: str):
        super().__init__(at, why)
        self.at, self.why = at, why


@dataclass
class _Run:
    """What the checks of one checkpoint share: the run's objects and the checkpoint's (checked) epoch."""

    expected: Any   # a checkpoint.Expected
    total_steps: int
    epoch: int = 0
    model: Any = None       # the network the checkpoint's "model" and "optimizer" are of (after a switch: the
    optimizer: Any = None   # extracted network, built by expected.switch)
    scheduler: Any = None
    gated: Any = None       # the gated model (after a shrink: without the removed channels, expected.shrink)


def validate(state: dict, expected: Any, path) -> None:
    """Check a checkpoint's contents against the run (``expected``, a checkpoint.Expected) before anything is
    restored (CheckpointError naming the field).

    Every entry that ``train.loop.fit_loop`` restores is checked for presence, type and range; tensors for the
    keys, shapes and dtypes of the run's own (model, optimizer, pruner, random generator state) and, when
    floating, for NaN and inf. Nothing is modified (the random generator state is tried and put back).
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} must hold a dict, got {show_value(state)}; delete it or use another "
                              "--out")
    run = _Run(expected, total_steps=expected.epochs * expected.steps_per_epoch, model=expected.model,
               optimizer=expected.optimizer, scheduler=expected.scheduler, gated=expected.model)
    try:
        switched = any(k in state for k in SWITCH_FIELDS) if isinstance(state, dict) else False
        shrinks = getattr(expected, "shrink", None) is not None
        _keys(state, (), FIELDS + (SWITCH_FIELDS if switched else ()) + ((SHRINK_FIELD,) if shrinks else ()),
              optional=(SHRINK_FIELD,), what="a checkpoint")
        if SHRINK_FIELD in state:
            _check_shrink(state[SHRINK_FIELD], (SHRINK_FIELD,), run)
        if switched:
            _check_switch(state, run)
        for name in FIELDS:
            _CHECKS[name](state[name], (name,), run)
        _check_agreement(state, run)
    except _Invalid as bad:
        raise CheckpointError(f"checkpoint {path}: field {_where(bad.at)} {bad.why}; delete it or use another "
                              "--out") from None


# ----- small checks: each raises _Invalid(at, why)

def _where(at: tuple) -> str:
    """``('optimizer', 'param_groups', 0, 'lr')`` -> ``'optimizer' entry 'param_groups'[0]['lr']``."""
    head, *rest = at
    text = repr(head)
    if rest:
        text += " entry " + repr(rest[0]) + "".join(f"[{k!r}]" for k in rest[1:])
    return text


def show_value(v) -> str:
    """A short description of a value for a message: its repr (cut), with its type where the repr hides it."""
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {tuple(v.shape)} and dtype {v.dtype}"
    text = repr(v)
    text = text if len(text) <= 60 else text[:57] + "..."
    return text if v is None or type(v) in (int, float, str, list, tuple, dict) else f"{text} (a {type(v).__name__})"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _span(lo, hi) -> str:
    return f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"


INT_MAX = 2 ** 63 - 1   # what an int field may hold: a count a run can reach (JSON, float and tensors take it)


def _int(v, at, lo=0, hi=None) -> int:
    if hi is None and _is_int(v) and v > INT_MAX:
        hi = INT_MAX
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        raise _Invalid(at, f"must be an int {_span(lo, hi)}, got {show_value(v)}")
    return v


def _real(v, at, lo=None, hi=None) -> float:
    if not _is_real(v) or not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        span = "" if lo is None and hi is None else " " + _span(lo, hi)
        raise _Invalid(at, f"must be a finite number{span}, got {show_value(v)}")
    return v


def _bool(v, at) -> bool:
    if not isinstance(v, bool):
        raise _Invalid(at, f"must be True or False, got {show_value(v)}")
    return v


def _kind(v, at, kind, name: str):
    if not isinstance(v, kind):
        raise _Invalid(at, f"must be {name}, got {show_value(v)}")
    return v


def _list(v, at, length: int | None = None) -> list:
    _kind(v, at, list, "a list")
    if length is not None and len(v) != length:
        raise _Invalid(at, f"must have {length} {'entry' if length == 1 else 'entries'}, got {len(v)}")
    return v


def _keys(v, at, keys, optional=(), what: str = "it") -> dict:
    """``v`` is a dict with every key of ``keys``, perhaps some of ``optional``, and nothing else (``what``
    names the kind of dict in the message)."""
    _kind(v, at, dict, "a dict")
    for key in keys:
        if key not in v:
            raise _Invalid(at + (key,), "is missing")
    allowed = set(keys) | set(optional)
    for key in v:
        if key not in allowed:
            raise _Invalid(at + (key,), f"is not an entry of {what}")
    return v


def same_value(v, want) -> bool:
    """Equal values of equal types (tensors, nested lists and dicts included), without ever raising."""
    try:
        return content_digest(v) == content_digest(want)
    except (TypeError, RecursionError):
        return False


def _equal(v, at, want) -> None:
    if not same_value(v, want):
        raise _Invalid(at, f"must be {show_value(want)} as in this run, got {show_value(v)}")



def _tensor(v, at, like: torch.Tensor, finite: bool = True) -> torch.Tensor:
    """A plain dense CPU tensor of ``like``'s shape and dtype; without NaN or inf when floating."""
    if not isinstance(v, torch.Tensor) or type(v) not in (torch.Tensor, torch.nn.Parameter) \
            or v.layout != torch.strided:
        raise _Invalid(at, f"must be a dense tensor, got {show_value(v)}")
    if tuple(v.shape) != tuple(like.shape) or v.dtype != like.dtype:
        raise _Invalid(at, f"must be a tensor of shape {tuple(like.shape)} and dtype {like.dtype} as in this "
                           f"run, got {show_value(v)}")
    if finite and (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
        raise _Invalid(at, "holds NaN or inf")
    return v


def _tensors_like(v, at, reference: dict) -> None:
    """A dict of tensors with exactly ``reference``'s keys, each of its shape and dtype."""
    _keys(v, at, tuple(reference), what="this run's model")
    for key, like in reference.items():
        _tensor(v[key], at + (key,), like)


def _reals(v, at, length, lo=None, hi=None) -> list:
    for i, x in enumerate(_list(v, at, length)):
        _real(x, at + (i,), lo, hi)
    return v


def _ints(v, at, length, lo=0, hi=None, increasing: bool = False) -> list:
    """A list of ``length`` ints in [lo, hi]; with ``increasing`` each above the one before."""
    for i, x in enumerate(_list(v, at, length)):
        _int(x, at + (i,), lo, hi)
        if increasing and i and x <= v[i - 1]:
            raise _Invalid(at + (i,), f"must be above the entry before it ({v[i - 1]}), got {x}")
    return v


# ----- the fields

def _check_format(v, at, run):
    _equal(v, at, CHECKPOINT_FORMAT)


def _check_config(v, at, run):
    _kind(v, at, dict, "a dict")   # its values were compared with this run's options already (load)


def _check_epoch(v, at, run):
    run.epoch = _int(v, at, 0, run.expected.epochs)


def _check_switch(state: dict, run: _Run) -> None:
    """A checkpoint after the switch: the gated model's state like the run's, a spec, and the extraction of the
    gated model (expected.switch) with that spec; the extracted network is what "model" is then checked against."""
    ex = run.expected
    if ex.switch is None:
        raise _Invalid(("spec",), "is there, but this run does not switch to the extracted network (--keep-gated, "
                                  "or no gates)")
    _tensors_like(state["gated_model"], ("gated_model",), run.gated.state_dict())
    _kind(state["spec"], ("spec",), dict, "a dict")
    try:
        ex.built = ex.switch(run.gated, state["gated_model"], state["spec"])
    except Exception as exc:   # extraction of a gated model that passed the checks above
        raise _Invalid(("spec",), f"does not match the gated model: {exc}") from None
    run.model, run.optimizer, run.scheduler = ex.built.model, ex.built.optimizer, ex.built.scheduler


def _check_shrink(v, at, run: _Run) -> None:
    """--shrink-every's state: per gate, the epoch ends it was closed in a row and whether it was removed; with
    removed gates, the gated model without their channels (expected.shrink) is what the rest is checked against."""
    ex = run.expected
    if getattr(ex, "shrink", None) is None:
        raise _Invalid(at, "is there, but this run does not shrink (--shrink-every)")
    _keys(v, at, ("streak", "removed"), what="the shrink state")
    from ..gates.bank import find_bank

    n = find_bank(ex.model).scores.numel()
    streak = _tensor(v["streak"], at + ("streak",), torch.zeros(n, dtype=torch.long))
    if bool((streak < 0).any()):
        raise _Invalid(at + ("streak",), "holds a negative count")
    removed = _tensor(v["removed"], at + ("removed",), torch.zeros(n, dtype=torch.bool))
    if not bool(removed.any()):
        return
    try:
        ex.shrunk = ex.shrink(removed)
    except Exception as exc:   # a removal this model cannot take
        raise _Invalid(at + ("removed",), f"names gates whose channels cannot be removed: {exc}") from None
    run.gated = run.model = ex.shrunk.model
    run.optimizer, run.scheduler = ex.shrunk.optimizer, ex.shrunk.scheduler


def _check_model(v, at, run):
    _tensors_like(v, at, run.model.state_dict())


def _check_optimizer(v, at, run):
    """torch.optim.SGD's state_dict: the run's parameter groups (hyperparameters equal but the scheduled lr)
    and momentum buffers shaped like their parameters."""
    opt = run.optimizer
    reference = opt.state_dict()
    _keys(v, at, ("state", "param_groups"), what="an optimizer's state_dict")
    groups = _list(v["param_groups"], at + ("param_groups",), len(reference["param_groups"]))
    params = {}
    for i, (group, want, live) in enumerate(zip(groups, reference["param_groups"], opt.param_groups)):
        g_at = at + ("param_groups", i)
        _keys(group, g_at, tuple(want), what="this run's parameter groups")
        for key, value in want.items():
            if key == "lr":   # moved by the scheduler
                _real(group[key], g_at + (key,), 0)
            else:
                _equal(group[key], g_at + (key,), value)
        params.update(zip(want["params"], live["params"]))
    state = _kind(v["state"], at + ("state",), dict, "a dict")
    for pid, entry in state.items():
        e_at = at + ("state", pid)
        if pid not in params:
            raise _Invalid(e_at, "is not a parameter of this run's optimizer")
        _keys(entry, e_at, ("momentum_buffer",), what="SGD's state of a parameter")
        _tensor(entry["momentum_buffer"], e_at + ("momentum_buffer",), params[pid].detach())


def _check_scheduler(v, at, run):
    """LambdaLR's state_dict: the run's base lrs and lambdas (None: functions are not saved), a step in range."""
    reference = run.scheduler.state_dict()
    total = run.total_steps
    _keys(v, at, tuple(reference), what=f"{type(run.scheduler).__name__}'s state_dict")
    for key, want in reference.items():
        k_at = at + (key,)
        if key == "last_epoch":
            _int(v[key], k_at, 0, total)
        elif key == "_step_count":
            _int(v[key], k_at, 1, total + 1)
        elif key == "_last_lr":
            _reals(v[key], k_at, len(want), 0)
        elif isinstance(want, bool):
            _bool(v[key], k_at)
        else:   # base_lrs, lr_lambdas: fixed by the options
            _equal(v[key], k_at, want)


def _check_scaler(v, at, run):
    scaler = run.expected.scaler
    if scaler is None or not scaler.is_enabled():
        if v is not None:
            raise _Invalid(at, f"must be None (this run does not scale the loss), got {show_value(v)}")
        return
    reference = scaler.state_dict()
    _keys(v, at, tuple(reference), what="GradScaler's state_dict")
    for key, want in reference.items():
        k_at = at + (key,)
        if key == "scale":
            _real(v[key], k_at, 0)
            if v[key] == 0:
                raise _Invalid(k_at, "must be a positive number, got 0")
        elif key == "_growth_tracker":
            _int(v[key], k_at, 0, reference.get("growth_interval"))
        else:
            _equal(v[key], k_at, want)


def _check_loss_step(v, at, run):
    _int(v, at, 0, run.total_steps)


def _check_dual_shift(v, at, run):
    _real(v, at, -1.0, 1.0)


def _check_pruner(v, at, run):
    """GradualPruner.state_dict: this pruner's method and config, masks of its weights' shapes, and the
    update records its schedule gives up to step ``t``."""
    pruner = run.expected.pruner
    if pruner is None:
        if v is not None:
            raise _Invalid(at, f"must be None (this run has no pruner), got {show_value(v)}")
        return
    reference = pruner.state_dict()
    _keys(v, at, tuple(reference), what="a pruner's state_dict")
    for key in ("format", "method", "config"):
        _equal(v[key], at + (key,), reference[key])
    t = _int(v["t"], at + ("t",), 0, pruner.total_steps)
    for i, (mask, like) in enumerate(zip(_list(v["masks"], at + ("masks",), len(reference["masks"])),
                                         reference["masks"])):
        _tensor(mask, at + ("masks", i), like)
    fixed = _list(v["fixed_masks"], at + ("fixed_masks",), len(reference["fixed_masks"]))
    for i, (mask, like) in enumerate(zip(fixed, reference["fixed_masks"])):
        if like is None:
            if mask is not None:
                raise _Invalid(at + ("fixed_masks", i), f"must be None as in this run, got {show_value(mask)}")
        else:
            _tensor(mask, at + ("fixed_masks", i), like)
    n_updates = min(t, pruner.end_step) // pruner.update_every
    for i, record in enumerate(_list(v["updates"], at + ("updates",), n_updates)):
        _check_update(record, at + ("updates", i), pruner, step=(i + 1) * pruner.update_every)


def _check_update(record, at, pruner, step: int) -> None:
    keys = ("step", "density_target", "N", "Z", "R", "k")
    _keys(record, at, keys, optional=("pruned",), what="a mask update's record")
    _int(record["step"], at + ("step",), step, step)
    _real(record["density_target"], at + ("density_target",), 0, 1)
    n = _int(record["N"], at + ("N",), pruner.N, pruner.N)
    z = _int(record["Z"], at + ("Z",), 0, n)
    _int(record["R"], at + ("R",), n - z, n - z)
    k = _int(record["k"], at + ("k",), 0, n)
    if k > 0 and "pruned" not in record:
        raise _Invalid(at + ("pruned",), "is missing")
    if k == 0 and "pruned" in record:
        raise _Invalid(at + ("pruned",), "must be absent where k is 0")
    if k > 0:
        _int(record["pruned"], at + ("pruned",), 0, k)


def _check_history(v, at, run):
    """trainer.History as a dict: one entry per epoch in the lists the trainer appends to every epoch (the
    gate statistics only when gated, the density also with a pruner), the step trace only when gated."""
    ex, n, total = run.expected, run.epoch, run.total_steps
    gated, tracked = ex.gated, ex.gated or ex.pruner is not None
    per_gated = n if gated else 0
    rules = {
        "epoch": lambda x, a: _check_epochs_done(x, a, n),
        "epoch_step": lambda x, a: _ints(x, a, n, 0, total),
        "train_loss": lambda x, a: _reals(x, a, n, 0),
        "penalty": lambda x, a: _reals(x, a, n),
        "test_accuracy": lambda x, a: _reals(x, a, n, 0, 1),
        "density": lambda x, a: _reals(x, a, n if tracked else 0, 0),
        "soft_density": lambda x, a: _reals(x, a, per_gated, 0),
        "polarized": lambda x, a: _reals(x, a, per_gated, 0, 1),
        "histogram": lambda x, a: [_reals(h, a + (i,), HISTOGRAM_BINS, 0)
                                   for i, h in enumerate(_list(x, a, per_gated))],
        "step": lambda x, a: _ints(x, a, len(_list(x, a)) if gated else 0, 0, total, increasing=True),
        "step_density": lambda x, a: _reals(x, a, len(v["step"]) if isinstance(v.get("step"), list) else None,
                                            0),
        "budget": lambda x, a: _check_budget(x, a, gated),
        # at most one entry per epoch done (fewer after resuming a checkpoint written before they existed)
        "epoch_seconds": lambda x, a: _reals(x, a, min(len(_list(x, a)), n), 0),
        "epoch_macs": lambda x, a: _ints(x, a, min(len(_list(x, a)), n), 0),
        "epoch_joules": lambda x, a: _reals(x, a, min(len(_list(x, a)), n), 0),
        "macs_trace": lambda x, a: [_ints(pair, a + (i,), 2, 0) for i, pair in enumerate(_list(x, a))],
        "switch_step": lambda x, a: _ints(x, a, len(_list(x, a)) if gated and len(x) <= 1 else 0, 0, total),
        "shrinks": lambda x, a: [_ints(pair, a + (i,), 2, 0) for i, pair in enumerate(_list(x, a))],
        "energy": lambda x, a: _plain(_kind(x, a, dict, "a dict"), a),
    }
    fields = tuple(ex.history_fields)
    required = tuple(f for f in fields if f not in COST_FIELDS)
    _keys(v, at, required, optional=tuple(f for f in fields if f in COST_FIELDS), what="the trainer's history")
    for name in fields:   # a field the trainer has and these rules do not know: a list or dict, unchecked
        if name in v:
            rules.get(name, lambda x, a: _kind(x, a, (list, dict), "a list or a dict"))(v[name], at + (name,))


def _plain(v, at, depth: int = 0, budget: list | None = None):
    """Plain JSON data (what report.json takes): None, bools, ints within INT_MAX, finite floats, strings,
    lists and string-keyed dicts of them, at most 8 deep and 10,000 items."""
    budget = [10_000] if budget is None else budget
    budget[0] -= 1
    if depth > 8 or budget[0] < 0:
        raise _Invalid(at, "is nested deeper or holds more than a run's record does")
    if v is None or isinstance(v, (bool, str)):
        return v
    if _is_int(v):
        return _int(v, at, -INT_MAX)
    if isinstance(v, float):
        return _real(v, at)
    if isinstance(v, list):
        for i, x in enumerate(v):
            _plain(x, at + (i,), depth + 1, budget)
        return v
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        for k, x in v.items():
            _plain(x, at + (k,), depth + 1, budget)
        return v
    raise _Invalid(at, f"must be plain data (numbers, strings, lists, dicts), got {show_value(v)}")


def _check_agreement(state: dict, run) -> None:
    """Fields that must agree with each other: the schedule's position is the steps of the epochs done (a
    scheduler put back to step 0 would train other weights than the run it claims to continue), and each
    group's learning rate is the schedule's at that position (an edited lr of 1e300 would train to inf)."""
    steps = run.epoch * run.expected.steps_per_epoch
    sched = state["scheduler"]
    if sched["last_epoch"] != steps:
        raise _Invalid(("scheduler", "last_epoch"), f"is {sched['last_epoch']}, and the {run.epoch} epochs done "
                                                     f"are {steps} steps")
    if sched["_step_count"] != steps + 1:
        raise _Invalid(("scheduler", "_step_count"), f"is {sched['_step_count']}, and the {run.epoch} epochs "
                                                      f"done make it {steps + 1}")
    lambdas = getattr(run.scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    for i, (base, fn) in enumerate(zip(sched["base_lrs"], lambdas)):
        want = base * fn(steps)
        for at, got in ((("scheduler", "_last_lr", i), sched["_last_lr"][i]),
                        (("optimizer", "param_groups", i, "lr"), state["optimizer"]["param_groups"][i]["lr"])):
            if abs(got - want) > 1e-12 * max(1.0, abs(want)):
                raise _Invalid(at, f"is {got}, and the schedule gives {want} after {steps} steps")


def _check_epochs_done(v, at, n: int) -> None:
    if not same_value(v, list(range(1, n + 1))):
        raise _Invalid(at, f"must be [1, ..., {n}] (the epochs done), got {show_value(v)}")


def _check_budget(v, at, gated: bool) -> None:
    """{} before the gates froze (always without gates), else BudgetResult.to_dict()."""
    _kind(v, at, dict, "a dict")
    if not v:
        return
    if not gated:
        raise _Invalid(at, f"must be {{}} (this run has no gates), got {show_value(v)}")
    _keys(v, at, BUDGET_FIELDS, what="a budget")
    for key in ("target_sparsity", "achieved_sparsity"):
        _real(v[key], at + (key,), 0, 1)
    for key in ("budget", "achieved_cost", "total"):
        _real(v[key], at + (key,), 0)
    for key in ("opened", "closed"):
        _int(v[key], at + (key,), 0)
    _kind(v["cost"], at + ("cost",), str, "a str")
    if v["reason"] is not None:
        _kind(v["reason"], at + ("reason",), str, "None or a str")


def _check_rng(v, at, run):
    """The CPU generator's state: a uint8 tensor of its size that torch.set_rng_state accepts (tried, then
    the current state is put back)."""
    current = torch.get_rng_state()
    _tensor(v, at, current)
    try:
        torch.set_rng_state(v)
    except RuntimeError as exc:
        raise _Invalid(at, f"is not a state of the random generator ({exc})") from None
    finally:
        torch.set_rng_state(current)


def _check_world_size(v, at, run):
    _int(v, at, 1)


_CHECKS = {
    "format": _check_format, "config": _check_config, "epoch": _check_epoch, "model": _check_model,
    "optimizer": _check_optimizer, "scheduler": _check_scheduler, "scaler": _check_scaler,
    "loss_step": _check_loss_step, "dual_shift": _check_dual_shift, "pruner": _check_pruner,
    "history": _check_history, "rng": _check_rng, "world_size": _check_world_size,
}
