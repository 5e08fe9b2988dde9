"""The exact budget: choose the gate set that meets the user's target under the exact cost model.

The penalty (:class:`~polarprune_cuda.PolarizationLoss`) shapes *which* gates
close; it cannot promise *how many*: a soft density on target says little
about the hard gates, and a run may end before the density settles.
:func:`meet_target` makes the promise. It ranks the gates by score and
opens them in that order while the exact cost of the extracted network
(``CostModel.cost`` of the effective hard gates: linear and bilinear
params/MACs terms, channels inside a closed block removed with it) stays
within the budget ``(1 - target_sparsity) * total``, skipping any gate whose
cost would overshoot so cheaper ones can fill the rest. It then sets the
scores so the hard gates are exactly that set (a flipped score keeps its
magnitude and changes sign), so the epochs after the gates freeze train the
weights of exactly the final architecture.

``min_channels`` and ``round_to`` (from :func:`~polarprune_cuda.attach_gates`)
are honoured: every group keeps its guard channels and widths stay
multiples of ``round_to``, so :func:`~polarprune_cuda.extract` adds nothing
afterwards. Where they make the target unreachable, the result is the
nearest achievable cost and :attr:`BudgetResult.reason` says why. With
block gates only (whole blocks, a coarse choice) and at most
``EXHAUSTIVE_BLOCKS`` of them, a score order that misses the tolerance is
replaced by the nearest of all subsets.

The trainer calls it when the gates freeze (``freeze_gates_at``), or at the
end of the run if they never do; a user with their own loop calls it once,
at the same point of theirs::

    result = pp.meet_target(model, target_sparsity=0.5, cost="macs")
    print(result)   # target 50.00% of macs removed; achieved 49.93%
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..defaults import COST
from ..gates.bank import GateBank
from ..ops.common import check_target_sparsity
from .attach import surgery_of
from .extract import guard
from .shrink import removed_in

#: the promise: achieved sparsity within this many fractions of the target (0.5 percentage points)
TOLERANCE = 0.005
#: with block gates only and at most this many blocks, every subset is tried for the nearest cost
EXHAUSTIVE_BLOCKS = 12


@dataclass
class BudgetResult:
    """What :func:`meet_target` chose: target and achieved sparsity in the cost unit, and what changed."""

    target_sparsity: float
    achieved_sparsity: float
    cost: str
    budget: float          # cost allowed: (1 - target) * total
    achieved_cost: float   # exact cost of the chosen gates
    total: float           # cost with every gate open
    opened: int            # gates whose score went from closed to open
    closed: int            # gates whose score went from open to closed
    reason: str | None     # why the target is out of reach (None when within TOLERANCE)

    @property
    def within_tolerance(self) -> bool:
        return abs(self.achieved_sparsity - self.target_sparsity) <= TOLERANCE + 1e-12

    def to_dict(self) -> dict:
        return {"target_sparsity": self.target_sparsity, "achieved_sparsity": self.achieved_sparsity,
                "cost": self.cost, "budget": self.budget, "achieved_cost": self.achieved_cost, "total": self.total,
                "opened": self.opened, "closed": self.closed, "reason": self.reason}

    def __str__(self) -> str:
        text = (f"target {100 * self.target_sparsity:.2f}% of {self.cost} removed; achieved "
                f"{100 * self.achieved_sparsity:.2f}%")
        return text + (f" ({self.reason})" if self.reason else "")


def _units(bank: GateBank, record, scores: list[Tensor], min_channels: int, round_to: int | None):
    """The forced gates (guards) and the selectable units: (priority, flat indices) in score order per segment."""
    offsets = bank.offsets
    forced: list[int] = []
    units: list[tuple[float, list[int]]] = []
    removed = removed_in(bank, record)
    for k, (rec, s) in enumerate(zip(record.groups, scores)):
        order = torch.argsort(s, descending=True, stable=True).tolist()
        gone = removed[offsets[k]:offsets[k] + rec.size]
        order = [i for i in order if not bool(gone[i])]   # channels removed while training (shrink.py) stay out
        need, step = guard(rec, min_channels, round_to)
        first = min(len(order), math.ceil(need / step) * step)
        forced.extend(offsets[k] + i for i in order[:first])
        for start in range(first, len(order), step):
            chunk = order[start:start + step]
            units.append((float(s[chunk].mean()), [offsets[k] + i for i in chunk]))
    for b in record.blocks:
        units.append((float(scores[b.segment][0]), [offsets[b.segment]]))
    # highest score first; ties in segment order (stable), so every rank and every run chooses alike
    units.sort(key=lambda u: -u[0])
    return forced, units


def _opened(g: Tensor, units) -> Tensor:
    """A copy of the gate set ``g`` with every gate of ``units`` ((priority, flat indices) pairs) opened."""
    out = g.clone()
    idx = [i for _, u in units for i in u]
    if idx:
        out[torch.tensor(idx)] = 1.0
    return out


def _fill(cost_of, g: Tensor, units, budget: float, slack: float) -> Tensor:
    """The score-order choice within ``budget``: the longest prefix, then a fill, then one nearer unit."""
    # 1. the longest prefix of the score order within budget (cost only grows as gates open: bisect)
    lo, hi = 0, len(units)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost_of(_opened(g, units[:mid])) <= budget + slack:
            lo = mid
        else:
            hi = mid - 1
    chosen = _opened(g, units[:lo])
    current = cost_of(chosen)
    # 2. fill: the remaining units in score order, each taken if it still fits
    rest = []
    for unit in units[lo:]:
        if budget - current <= slack:
            rest.append(unit)
            continue
        trial = _opened(chosen, [unit])
        c = cost_of(trial)
        if c <= budget + slack:
            chosen, current = trial, c
        else:
            rest.append(unit)
    # 3. nearest: one more unit if it lands closer to the budget from above than the fill from below
    best, best_gap = None, budget - current
    for unit in rest:
        if best_gap <= slack:
            break
        trial = _opened(chosen, [unit])
        gap = abs(cost_of(trial) - budget)
        if gap < best_gap:
            best, best_gap = trial, gap
    return chosen if best is None else best


def _nearest_subset(cost_of, g: Tensor, units, budget: float) -> Tensor:
    """Of all subsets of ``units`` (few, coarse block gates), the one nearest the budget (then the higher
    total score)."""
    best_key, chosen = None, g
    for mask in range(1 << len(units)):
        picked = [u for k, u in enumerate(units) if mask >> k & 1]
        trial = _opened(g, picked)
        key = (abs(cost_of(trial) - budget), -sum(p for p, _ in picked))
        if best_key is None or key < best_key:
            best_key, chosen = key, trial
    return chosen


def _shortfall(record, round_to, exhaustive: bool, achieved: float) -> str:
    """Why the achieved sparsity misses the target by more than TOLERANCE."""
    why = []
    if round_to:
        why.append(f"round_to={round_to} keeps widths in steps of up to {round_to} channels")
    if record.blocks and not record.groups:
        why.append("block gates remove whole blocks only" + ("" if exhaustive else
                   f" (more than {EXHAUSTIVE_BLOCKS} blocks: the nearest along the score order)"))
    if not why:
        why.append("no remaining gate is small enough to close the gap")
    return " and ".join(why) + f": the nearest achievable sparsity is {100 * achieved:.2f}%"


def select_gates(model, target_sparsity: float, cost: str = COST, min_channels: int | None = None,
                 round_to: int | None = None) -> tuple[Tensor, BudgetResult]:
    """The gate set that meets the target (without changing the model): a 0/1 float tensor over the bank's
    gates, and the :class:`BudgetResult` it would give. See :func:`meet_target`."""
    target = check_target_sparsity(target_sparsity)
    bank, record = surgery_of(model)
    bank.check_finite()
    cm = bank.exact_cost(cost)
    min_channels = record.min_channels if min_channels is None else min_channels
    round_to = record.round_to if round_to is None else round_to
    s = bank.scores.detach().double().cpu()
    forced, units = _units(bank, record, list(s.split(bank.sizes)), min_channels, round_to)
    device = bank.scores.device
    budget = (1.0 - target) * cm.total
    # the smallest cost unit decides how close the fill can get; a relative slack of 1e-9 absorbs rounding
    slack = 1e-9 * cm.total

    def cost_of(g: Tensor) -> float:
        return cm.cost(bank.effective(g.to(device, torch.float32)))

    g = torch.zeros(s.numel(), dtype=torch.float64)
    if forced:
        g[torch.tensor(forced)] = 1.0
    floor = cost_of(g)
    reason = None
    if floor > budget + slack:
        chosen = g
        reason = (f"min_channels={min_channels}" + (f" and round_to={round_to}" if round_to else "")
                  + f" keep at least {100 * floor / cm.total:.2f}% of the {cost}: the nearest achievable "
                  f"sparsity is {100 * (1 - floor / cm.total):.2f}%")
    else:
        chosen = _fill(cost_of, g, units, budget, slack)
    exhaustive = (reason is None and not record.groups and len(units) <= EXHAUSTIVE_BLOCKS
                  and abs(cost_of(chosen) - budget) > TOLERANCE * cm.total)
    if exhaustive:   # block gates only: few, coarse units, so the score order may pass by a nearer subset
        chosen = _nearest_subset(cost_of, g, units, budget)
    achieved_cost = cost_of(chosen)
    achieved = 1.0 - achieved_cost / cm.total
    if reason is None and abs(achieved - target) > TOLERANCE:
        reason = _shortfall(record, round_to, exhaustive, achieved)
    hard = (s > 0).double()
    result = BudgetResult(target, achieved, cost, budget, achieved_cost, cm.total,
                          opened=int(((chosen > 0) & (hard == 0)).sum()),
                          closed=int(((chosen == 0) & (hard > 0)).sum()), reason=reason)
    return chosen, result


@torch.no_grad()
def budget_disagreement(model, budget: dict) -> str | None:
    """Why ``budget`` (:meth:`BudgetResult.to_dict`, as a checkpoint holds it) is not what ``model``'s hard
    gates give, or None: its total, achieved cost and achieved sparsity recomputed from the gates."""
    now = budget_now(model, budget)
    for name in ("total", "achieved_cost", "achieved_sparsity"):
        want, got = budget[name], now[name]
        if abs(want - got) > 1e-6 * max(1.0, abs(got)):
            return f"its {name} is {want}, the gates it holds give {got}"
    return None


@torch.no_grad()
def budget_now(model, budget: dict) -> dict:
    """``budget`` (:meth:`BudgetResult.to_dict`) with its total, allowance, achieved cost and achieved sparsity
    recomputed from ``model``'s hard gates and its cost model as it is now (a measured cost, such as latency
    timed again elsewhere, gives other figures for the same gates)."""
    bank, _ = surgery_of(model)
    cm = bank.exact_cost(budget["cost"])
    cost = bank.hard_cost(budget["cost"])
    return {**budget, "total": cm.total, "budget": (1.0 - budget["target_sparsity"]) * cm.total,
            "achieved_cost": cost, "achieved_sparsity": 1.0 - cost / cm.total}


@torch.no_grad()
def meet_target(model, target_sparsity: float, cost: str = COST, min_channels: int | None = None,
                round_to: int | None = None) -> BudgetResult:
    """Set the model's gates to the set that meets ``target_sparsity`` of ``cost`` exactly; returns what it chose.

    Args:
        model: a model gated with :func:`~polarprune_cuda.attach_gates`.
        target_sparsity: fraction of the cost to remove, in [0, 1). 0 keeps every gate open.
        cost: ``"channels"``, ``"params"`` or ``"macs"`` (any kind the model's gate bank has).
        min_channels, round_to: override the values given to attach_gates.

    Gates are opened in score order while the exact cost of the extracted
    network stays within ``(1 - target_sparsity)`` of the dense cost; the
    result is within 0.5 percentage points of the target unless
    ``min_channels``/``round_to`` (or block-only gates) make that
    unreachable, in which case it is the nearest achievable value and
    ``reason`` says why. Call it once, when the gates stop training (after
    it, keep the gate scores fixed and train the weights: they then train
    exactly the final architecture). Deterministic: the same scores give the
    same choice on every rank.
    """
    bank, _ = surgery_of(model)
    chosen, result = select_gates(model, target_sparsity, cost, min_channels, round_to)
    s = bank.scores.detach()
    keep = chosen.to(s.device).bool()
    magnitude = s.abs().clamp(min=1e-3)
    new = torch.where(keep, torch.where(s > 0, s, magnitude), torch.where(s > 0, -magnitude, s))
    bank.scores.copy_(new)
    return result
