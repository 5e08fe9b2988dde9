"""The schema of a training checkpoint: :func:`validate` compares a loaded checkpoint with the state the resuming
run would save itself (``Expected.saved``: train.loop's own checkpoint function on the run's freshly built objects,
so what is checked cannot drift from what is saved), before anything is restored.

The comparison is structural: the same dict keys (a missing or unexpected one named by its path), containers and
list lengths, tensors of the same shape and dtype (finite where floating), numbers of the same type (an int in
[0, 2^63 - 1]; a float finite, an int taken for it). :func:`_rules` take over where a value is not a tensor and its
structure is not enough (values fixed by the options, ranges, the history's lists, which grow with the epochs, the
optimizer's state, empty before the first step, the generator state). A checkpoint written after a shrink or the
switch is of other networks: they are rebuilt from its checked entries, and the run's state is taken again on them.

Every failure is a :class:`CheckpointError` naming the file and the field; nothing is modified.
:mod:`~polarprune_cuda.train.checkpoint` re-exports the constants with :func:`validate`.
"""
from __future__ import annotations

from typing import Any

import torch

from .._io import content_digest
from ..errors import CheckpointError
from ..ops.common import is_number
from ..surgery.budget import BudgetResult

CHECKPOINT_FORMAT = 1
#: the top-level entries of every checkpoint, what train.loop.fit_loop saves (validate takes them from the run's
#: own state; this names them for tests)
FIELDS = ("format", "config", "epoch", "model", "optimizer", "scheduler", "scaler", "loss_step", "dual_shift",
          "pruner", "history", "rng", "world_size")
#: a checkpoint written after the switch to the extracted network also holds the gated model's state
#: ("gated_model"; its "model" is then the extracted network's) and the extraction's spec
SWITCH_FIELDS = ("gated_model", "spec")
#: a checkpoint of a run with --shrink-every also holds "shrink": {"streak", "removed"}, one entry per gate
SHRINK_FIELD = "shrink"
#: History's training-cost fields, absent from checkpoints written before they existed
COST_FIELDS = ("epoch_seconds", "epoch_macs", "epoch_joules", "macs_trace", "switch_step", "energy", "shrinks")
HISTOGRAM_BINS = 20
INT_MAX = 2 ** 63 - 1   # what an int may hold: a count a run can reach (JSON, float and tensors take it)
#: history["budget"] once the gates froze has the structure of BudgetResult.to_dict() ({} before)
_BUDGET = BudgetResult(0.0, 0.0, "", 0.0, 0.0, 0.0, 0, 0, None).to_dict()


class _Invalid(Exception):
    """One field is wrong: ``at`` is its path in the checkpoint, ``why`` what is wrong with it."""

    def __init__(self, at: tuple, why: str):
        super().__init__(at, why)
        self.at, self.why = at, why


def validate(state: dict, expected: Any, path) -> None:
    """Compare a checkpoint's contents with the state the run (``expected``, a checkpoint.Expected) would save,
    before anything is restored (CheckpointError naming the field). Nothing is modified (the random generator
    state is tried and put back)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} must hold a dict, got {show_value(state)}; delete it or use another "
                              "--out")
    if expected.saved is None:
        raise TypeError("Expected.saved (the state the run would save) is needed to check a checkpoint")
    try:
        _Walk(state, expected).run()
    except _Invalid as bad:
        raise CheckpointError(f"checkpoint {path}: field {_where(bad.at)} {bad.why}; delete it or use another "
                              "--out") from None


class _Walk:
    """One comparison: the checkpoint, the run (``ex``), the networks the checkpoint is of (the run's; after a shrink
    or the switch, rebuilt from the checkpoint) and the rules, which count with the checkpoint's epoch."""

    def __init__(self, state: dict, ex):
        self.state, self.ex, self.epoch, self.rules = state, ex, 0, []
        self.model = self.gated = ex.model   # after the switch: model is the extracted network, gated the gated one
        self.optimizer, self.scheduler = ex.optimizer, ex.scheduler
        #: what a dict is, for an unexpected key (else "this run's <field>")
        self.names = [((), "a checkpoint"), (("gated_model",), "this run's model"),
                      (("optimizer", "state", ...), f"{type(ex.optimizer).__name__}'s state of a parameter"),
                      (("scheduler",), f"{type(ex.scheduler).__name__}'s state_dict"),
                      (("history",), "the trainer's history"), (("history", "budget"), "a budget")]

    def saved(self) -> dict:
        """What the run would save with the networks the checkpoint is of (train.loop's own checkpoint function)."""
        return self.ex.saved(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                             scaler=self.ex.scaler, pruner=self.ex.pruner,
                             gated_model=self.gated if self.gated is not self.model else None)

    def run(self) -> None:
        state, ex = self.state, self.ex
        want = self.saved()
        switched = any(k in state for k in SWITCH_FIELDS)
        if switched and ex.switch is None:
            raise _Invalid(("spec",), "is there, but this run does not switch to the extracted network (--keep-gated, "
                                      "or no gates)")
        if SHRINK_FIELD in state and SHRINK_FIELD not in want:
            raise _Invalid((SHRINK_FIELD,), "is there, but this run does not shrink (--shrink-every)")
        _keys(state, (), tuple(want) + (SWITCH_FIELDS if switched else ()), what="a checkpoint")
        self.epoch = _int(state["epoch"], ("epoch",), 0, ex.epochs)
        self.rules = _rules(ex, self.epoch)
        # the entries that say which networks the rest is of: with removed gates, the gated model without their
        # channels (expected.shrink); after the switch, the extraction (expected.switch) of the checkpoint's gated
        # model, with its spec. Then the run's state on those networks.
        if SHRINK_FIELD in want:
            self.compare(state[SHRINK_FIELD], want[SHRINK_FIELD], (SHRINK_FIELD,))
            removed = state[SHRINK_FIELD]["removed"]
            if bool(removed.any()):
                try:
                    ex.shrunk = ex.shrink(removed)
                except Exception as exc:   # a removal this model cannot take
                    raise _Invalid((SHRINK_FIELD, "removed"), f"names gates whose channels cannot be removed: "
                                                              f"{exc}") from None
                self.model = self.gated = ex.shrunk.model
                self.optimizer, self.scheduler = ex.shrunk.optimizer, ex.shrunk.scheduler
        if switched:
            self.compare(state["gated_model"], self.saved()["model"], ("gated_model",))
            spec = _kind(state["spec"], ("spec",), dict, "a dict")
            try:
                ex.built = ex.switch(self.gated, state["gated_model"], spec)
            except Exception as exc:   # extraction of a gated model that passed the checks
                raise _Invalid(("spec",), f"does not match the gated model: {exc}") from None
            self.model, self.optimizer, self.scheduler = ex.built.model, ex.built.optimizer, ex.built.scheduler
        for key, value in self.saved().items():
            if key not in ("epoch", SHRINK_FIELD, *SWITCH_FIELDS):   # checked above
                self.compare(state[key], value, (key,))
        _check_agreement(state, self)

    def compare(self, v, want, at: tuple) -> None:
        """``v``, the checkpoint's entry at ``at``, against ``want``, the run's own: by the rule for ``at`` where one
        matches, else by structure."""
        rule = _find(self.rules, at)
        if rule is not None:
            rule(v, at, want, self)
        else:
            self.structure(v, want, at)

    def structure(self, v, want, at: tuple) -> None:
        """``v`` against ``want`` by structure, what inside it by :meth:`compare`."""
        if isinstance(want, torch.Tensor):
            _tensor(v, at, want)
        elif isinstance(want, dict):
            optional = COST_FIELDS if at == ("history",) else ()   # absent from older checkpoints
            _keys(v, at, tuple(k for k in want if k not in optional), optional,
                  what=_find(self.names, at) or f"this run's {at[0]}")
            for key, item in want.items():
                if key in v:
                    self.compare(v[key], item, at + (key,))
        elif isinstance(want, (list, tuple)):
            for i, (x, item) in enumerate(zip(_list(v, at, len(want), kind=type(want)), want)):
                self.compare(x, item, at + (i,))
        elif want is None:
            if v is not None:
                why = {("scaler",): " (this run does not scale the loss)", ("pruner",): " (this run has no pruner)"}
                raise _Invalid(at, f"must be None{why.get(at, ' as in this run')}, got {show_value(v)}")
        elif isinstance(want, bool):
            _kind(v, at, bool, "True or False")
        elif isinstance(want, int):
            _int(v, at)
        elif isinstance(want, float):
            _real(v, at)
        elif isinstance(want, str):
            _kind(v, at, str, "a str")
        else:
            _equal(v, at, want)


def _find(table, at: tuple):
    """The value of the first (pattern, value) of ``table`` whose pattern is ``at`` (``...`` matches any key)."""
    for pattern, value in table:
        if len(pattern) == len(at) and all(p is ... or p == k for p, k in zip(pattern, at)):
            return value
    return None


# ----- the rules: where the structure of the run's own state is not enough

def _rules(ex, epoch: int) -> list:
    """(path pattern, rule), the first match wins; ``rule(value, path, the run's own value, walk)`` raises _Invalid.
    ``epoch``: the checkpoint's (checked), the epochs done."""
    total = ex.epochs * ex.steps_per_epoch
    gated, pruner = ex.gated, ex.pruner
    per_gate = epoch if gated else 0
    pairs = _each(None, _each(2, _ints()))   # [step, a count] of each change of network
    return [
        (("format",), _same),
        (("config",), lambda *_: None),   # compared with the run's options by Checkpointer.load (keys may differ)
        # per parameter group: the options' hyperparameters, and the learning rate the schedule moved
        (("optimizer", "state"), _optimizer_state),
        (("optimizer", "param_groups", ..., "lr"), _reals(0)),
        (("optimizer", "param_groups", ..., ...), _same),
        (("scheduler", "last_epoch"), _ints(0, total)),
        (("scheduler", "_step_count"), _ints(1, total + 1)),
        (("scheduler", "_last_lr", ...), _reals(0)),
        (("scheduler", "base_lrs"), _same),
        (("scheduler", "lr_lambdas"), _same),   # None: functions are not saved
        (("scaler", "scale"), _positive),
        (("scaler", "_growth_tracker"), lambda v, at, want, w: _int(v, at, 0, ex.scaler.get_growth_interval())),
        (("scaler", ...), _same),
        (("loss_step",), _ints(0, total)),
        (("dual_shift",), _reals(-1.0, 1.0)),
        *((("pruner", key), _same) for key in ("format", "method", "config")),
        (("pruner", "t"), _ints(0, pruner.total_steps if pruner is not None else 0)),
        (("pruner", "updates"), _updates),
        (("shrink", "streak"), _counts),
        # history: one entry per epoch done in the lists the trainer appends to every epoch (the gate statistics
        # only when gated, the density also with a pruner), the step trace only when gated
        (("history", "epoch"), _epochs_done),
        (("history", "epoch_step"), _each(epoch, _ints(0, total))),
        (("history", "train_loss"), _each(epoch, _reals(0))),
        (("history", "penalty"), _each(epoch, _reals())),
        (("history", "test_accuracy"), _each(epoch, _reals(0, 1))),
        (("history", "density"), _each(epoch if gated or pruner is not None else 0, _reals(0))),
        (("history", "soft_density"), _each(per_gate, _reals(0))),
        (("history", "polarized"), _each(per_gate, _reals(0, 1))),
        (("history", "histogram"), _each(per_gate, _each(HISTOGRAM_BINS, _reals(0)))),
        (("history", "step"), _each(None if gated else 0, _ints(0, total), increasing=True)),
        (("history", "step_density"),   # the density at each step of the trace (a list: checked before it)
         lambda v, at, want, w: _each(len(w.state["history"]["step"]), _reals(0))(v, at, want, w)),
        (("history", "budget"), _budget),
        # at most one entry per epoch done (fewer after resuming a checkpoint written before they existed)
        (("history", "epoch_seconds"), _each(epoch, _reals(0), at_most=True)),
        (("history", "epoch_macs"), _each(epoch, _ints(), at_most=True)),
        (("history", "epoch_joules"), _each(epoch, _reals(0), at_most=True)),
        (("history", "macs_trace"), pairs),
        (("history", "shrinks"), pairs),
        (("history", "switch_step"), _each(1 if gated else 0, _ints(0, total), at_most=True)),
        (("history", ...), _plain_like),   # energy, and a field without a rule of its own
        *((("history", "budget", key), _reals(0, 1)) for key in ("target_sparsity", "achieved_sparsity")),
        *((("history", "budget", key), _reals(0)) for key in ("budget", "achieved_cost", "total")),
        (("history", "budget", "reason"), lambda v, at, want, w: v is None or _kind(v, at, str, "None or a str")),
        (("rng",), _rng),
        (("world_size",), _ints(1)),
    ]


def _same(v, at, want, walk) -> None:
    _equal(v, at, want)


def _ints(lo: int = 0, hi: int | None = None):
    return lambda v, at, want, walk: _int(v, at, lo, hi)


def _reals(lo: float | None = None, hi: float | None = None):
    return lambda v, at, want, walk: _real(v, at, lo, hi)


def _each(length: int | None, rule, at_most: bool = False, increasing: bool = False):
    """A rule: a list of ``length`` entries (None: any number; ``at_most``: up to it), each checked by ``rule``
    (``increasing``: each above the one before)."""
    def check(v, at, want, walk):
        for i, x in enumerate(_list(v, at, length, at_most)):
            rule(x, at + (i,), None, walk)
            if increasing and i and x <= v[i - 1]:
                raise _Invalid(at + (i,), f"must be above the entry before it ({v[i - 1]}), got {x}")
    return check


def _positive(v, at, want, walk) -> None:
    if _real(v, at, 0) == 0:
        raise _Invalid(at, "must be a positive number, got 0")


def _counts(v, at, want, walk) -> None:
    if bool((_tensor(v, at, want) < 0).any()):
        raise _Invalid(at, "holds a negative count")


def _optimizer_state(v, at, want, walk) -> None:
    """Per parameter (its index in the groups), what the optimizer keeps for it. The run's own optimizer has not
    stepped, so its state is empty: an entry is compared with SGD's, a momentum buffer like the parameter. An entry
    may be absent (a parameter that never had a gradient)."""
    opt = walk.optimizer
    ids = (i for group in opt.state_dict()["param_groups"] for i in group["params"])
    params = dict(zip(ids, (p for group in opt.param_groups for p in group["params"])))
    for pid, entry in _kind(v, at, dict, "a dict").items():
        if pid not in params:
            raise _Invalid(at + (pid,), "is not a parameter of this run's optimizer")
        walk.compare(entry, want.get(pid) or {"momentum_buffer": params[pid].detach()}, at + (pid,))


def _updates(v, at, want, walk) -> None:
    """GradualPruner's mask update records (a fresh pruner has none): as many as its schedule gives up to step
    ``t``, each with its step, the density target, N the prunable weights, Z the zeros the ranking saw, R = N - Z,
    k the number to prune and, where k > 0, the number pruned."""
    pruner = walk.ex.pruner
    t = _int(walk.state["pruner"]["t"], at[:-1] + ("t",), 0, pruner.total_steps)
    for i, record in enumerate(_list(v, at, min(t, pruner.end_step) // pruner.update_every)):
        r_at, step = at + (i,), (i + 1) * pruner.update_every
        _keys(record, r_at, ("step", "density_target", "N", "Z", "R", "k"), ("pruned",), "a mask update's record")
        _int(record["step"], r_at + ("step",), step, step)
        _real(record["density_target"], r_at + ("density_target",), 0, 1)
        n = _int(record["N"], r_at + ("N",), pruner.N, pruner.N)
        z = _int(record["Z"], r_at + ("Z",), 0, n)
        _int(record["R"], r_at + ("R",), n - z, n - z)
        k = _int(record["k"], r_at + ("k",), 0, n)
        if ("pruned" in record) != (k > 0):
            raise _Invalid(r_at + ("pruned",), "is missing" if k > 0 else "must be absent where k is 0")
        if k > 0:
            _int(record["pruned"], r_at + ("pruned",), 0, k)


def _epochs_done(v, at, want, walk) -> None:
    if not same_value(v, list(range(1, walk.epoch + 1))):
        raise _Invalid(at, f"must be [1, ..., {walk.epoch}] (the epochs done), got {show_value(v)}")


def _budget(v, at, want, walk) -> None:
    """{} before the gates froze (always without gates), else a BudgetResult.to_dict() (its values against the
    gates: train.loop checks them after the restore)."""
    if not _kind(v, at, dict, "a dict"):
        return
    if not walk.ex.gated:
        raise _Invalid(at, f"must be {{}} (this run has no gates), got {show_value(v)}")
    walk.structure(v, _BUDGET, at)


def _plain_like(v, at, want, walk) -> None:
    """A history field without a rule of its own (energy, or one added later): plain data of the kind the run
    keeps there (lists grow, so their length is free)."""
    _plain(_kind(v, at, type(want), f"a {type(want).__name__}"), at)


def _plain(v, at, depth: int = 0, budget: list | None = None):
    """Plain JSON data (what report.json takes): None, bools, ints within INT_MAX, finite floats, strings,
    lists and string-keyed dicts of them, at most 8 deep and 10,000 items."""
    budget = [10_000] if budget is None else budget
    budget[0] -= 1
    if depth > 8 or budget[0] < 0:
        raise _Invalid(at, "is nested deeper or holds more than a run's record does")
    if v is None or isinstance(v, (bool, str)):
        return v
    if type(v) is int:
        return _int(v, at, -INT_MAX)
    if type(v) is float:
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


def _rng(v, at, want, walk) -> None:
    """The CPU generator's state: like the run's, and one torch.set_rng_state accepts (tried, then the current
    state is put back)."""
    _tensor(v, at, want)
    current = torch.get_rng_state()
    try:
        torch.set_rng_state(v)
    except RuntimeError as exc:
        raise _Invalid(at, f"is not a state of the random generator ({exc})") from None
    finally:
        torch.set_rng_state(current)


def _check_agreement(state: dict, walk: _Walk) -> None:
    """Fields that must agree with each other: the schedule's position is the steps of the epochs done (a
    scheduler put back to step 0 would train other weights than the run it claims to continue), and each
    group's learning rate is the schedule's at that position (an edited lr of 1e300 would train to inf)."""
    steps = walk.epoch * walk.ex.steps_per_epoch
    sched = state["scheduler"]
    if sched["last_epoch"] != steps:
        raise _Invalid(("scheduler", "last_epoch"), f"is {sched['last_epoch']}, and the {walk.epoch} epochs done "
                                                     f"are {steps} steps")
    if sched["_step_count"] != steps + 1:
        raise _Invalid(("scheduler", "_step_count"), f"is {sched['_step_count']}, and the {walk.epoch} epochs "
                                                      f"done make it {steps + 1}")
    for i, (base, fn) in enumerate(zip(sched["base_lrs"], getattr(walk.scheduler, "lr_lambdas", ()))):
        want = base * fn(steps)
        for at, got in ((("scheduler", "_last_lr", i), sched["_last_lr"][i]),
                        (("optimizer", "param_groups", i, "lr"), state["optimizer"]["param_groups"][i]["lr"])):
            if abs(got - want) > 1e-12 * max(1.0, abs(want)):
                raise _Invalid(at, f"is {got}, and the schedule gives {want} after {steps} steps")


# ----- small checks: each raises _Invalid(at, why)

def _where(at: tuple) -> str:
    """``('optimizer', 'param_groups', 0, 'lr')`` -> ``'optimizer' entry 'param_groups'[0]['lr']``."""
    head, *rest = at
    return repr(head) + ("".join([" entry " + repr(rest[0]), *(f"[{k!r}]" for k in rest[1:])]) if rest else "")


def show_value(v) -> str:
    """A short description of a value for a message: its repr (cut), with its type where the repr hides it."""
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {tuple(v.shape)} and dtype {v.dtype}"
    text = repr(v)
    text = text if len(text) <= 60 else text[:57] + "..."
    return text if v is None or type(v) in (int, float, str, list, tuple, dict) else f"{text} (a {type(v).__name__})"


def same_value(v, want) -> bool:
    """Equal values of equal types (tensors, nested lists and dicts included), without ever raising."""
    try:
        return content_digest(v) == content_digest(want)
    except (TypeError, RecursionError):
        return False


def _span(lo, hi) -> str:
    return f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"


def _int(v, at, lo=0, hi=None) -> int:
    if hi is None and type(v) is int and v > INT_MAX:
        hi = INT_MAX
    if type(v) is not int or v < lo or (hi is not None and v > hi):   # type: a bool is no count
        raise _Invalid(at, f"must be an int {_span(lo, hi)}, got {show_value(v)}")
    return v


def _real(v, at, lo=None, hi=None) -> float:
    # an int past INT_MAX first: is_number would overflow converting it to a float
    if (type(v) is int and abs(v) > INT_MAX) or not is_number(v) or (lo is not None and v < lo) \
            or (hi is not None and v > hi):
        span = "" if lo is None and hi is None else " " + _span(lo, hi)
        raise _Invalid(at, f"must be a finite number{span}, got {show_value(v)}")
    return v


def _kind(v, at, kind, name: str):
    if not isinstance(v, kind):
        raise _Invalid(at, f"must be {name}, got {show_value(v)}")
    return v


def _list(v, at, length: int | None = None, at_most: bool = False, kind=list) -> list:
    _kind(v, at, kind, f"a {kind.__name__}")
    if length is not None and (len(v) > length if at_most else len(v) != length):
        raise _Invalid(at, f"must have {'at most ' if at_most else ''}{length} {'entry' if length == 1 else 'entries'}"
                           f", got {len(v)}")
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


def _equal(v, at, want) -> None:
    if not same_value(v, want):
        raise _Invalid(at, f"must be {show_value(want)} as in this run, got {show_value(v)}")


def _tensor(v, at, like: torch.Tensor) -> torch.Tensor:
    """A plain dense CPU tensor of ``like``'s shape and dtype; without NaN or inf when floating."""
    if not isinstance(v, torch.Tensor) or type(v) not in (torch.Tensor, torch.nn.Parameter) \
            or v.layout != torch.strided:
        raise _Invalid(at, f"must be a dense tensor, got {show_value(v)}")
    if tuple(v.shape) != tuple(like.shape) or v.dtype != like.dtype:
        raise _Invalid(at, f"must be a tensor of shape {tuple(like.shape)} and dtype {like.dtype} as in this "
                           f"run, got {show_value(v)}")
    if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
        raise _Invalid(at, "holds NaN or inf")
    return v
