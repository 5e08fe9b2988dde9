"""The flat gate bank of a model.

:class:`GateBank`: every gate score of a model in one contiguous parameter,
split into *segments* (one per gate group). Gate modules (``modules.py``) bound
to a bank read their segment's gates; the bank computes all gates of the
network with one ``binary_gate`` call per forward pass (and one backward call).
:func:`bind_gates` gathers the gate modules of a model into a bank; several
modules may share one segment (channels coupled by residual additions).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from ..ops import functional
from ..ops.common import check_float, check_scores, check_ste
from ..ops.cost import CostModel
from ..errors import NonFiniteGateError
from .modules import GateMixin, gate_modules

BANK_ATTR = "polarprune_bank"


class GateBank(nn.Module):
    """All gate scores of a model in one flat parameter ``scores``, split into segments.

    ``gates()`` returns the hard gates of every segment. Inside a forward pass of
    the model the bank is bound to, it is computed once (one ``binary_gate`` call)
    and shared by every gate module; outside one it is computed on each call.

    Per-segment cost vectors (``channels`` by default; others such as ``params``
    or ``macs`` are registered with :meth:`set_cost`) weight the density that
    :class:`~polarprune_cuda.PolarizationLoss` drives to its target.
    """

    def __init__(self, ste: str = "identity", tau: float = 1.0):
        super().__init__()
        check_ste(ste, tau)
        self.ste = ste
        self.tau = float(tau)
        self.scores = nn.Parameter(torch.zeros(0))
        self.names: list[str] = []
        self.sizes: list[int] = []
        self._costs: dict[str, CostModel] = {}
        self._exact: dict = {}   # cost kind -> the exact cost of a hard gate set, where it is not the cost model's
        self.unavailable: dict[str, str] = {}   # cost kind -> why this bank cannot weigh gates by it
        self._cache: tuple[Tensor, ...] | None = None
        self._active = False
        self._hooks: list = []
        self._penalty: tuple | None = None     # (key, cost model, rho, form, t) armed by PolarizationLoss
        self._terms: tuple | None = None       # (key, terms) of the last forward pass, taken once
        self.block_of: list[int] = []          # per segment: the block gate segment that also closes it, or -1
        self.block_segments: list[int] = []    # segments that are block gates (one gate each)
        self._block_map: Tensor | None = None
        #: what :func:`~polarprune_cuda.attach_gates` did (a ``surgery.attach.SurgeryRecord``, kept for
        #: extract, kept_channels and meet_target); None for a bank not made by attach_gates
        self.surgery = None
        self._score_grad_hook = None           # the hook of scale_score_gradients (not copied: see __getstate__)

    def scale_score_gradients(self, scale: Tensor | None) -> None:
        """Multiply the scores' gradient by ``scale`` (one factor per gate) from now on; None removes it.

        The trainer uses it so block gates take the step they would take in a bank of block gates alone
        (train/optim.make_optimizer). One hook at most: a new scale replaces the old one."""
        if self._score_grad_hook is not None:
            self._score_grad_hook.remove()
            self._score_grad_hook = None
        if scale is not None:
            factor = scale.detach().to(self.scores.device)
            self._score_grad_hook = self.scores.register_hook(lambda grad: grad * factor.to(grad.dtype))

    # ----- building
    def add_segment(self, name: str, init_scores: Tensor) -> int:
        """Append a segment with the given initial scores; returns its index."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if name in self.names:
            raise ValueError(f"a segment named {name!r} already exists")
        init_scores = check_scores(init_scores, "init_scores").detach()
        if init_scores.numel() == 0:
            raise ValueError(f"segment {name!r} must have at least one gate")
        if self.scores.numel():
            init_scores = init_scores.to(self.scores.device)
        data = torch.cat([self.scores.data, init_scores.to(torch.float32)])
        self.scores = nn.Parameter(data)
        self.names.append(name)
        self.sizes.append(init_scores.numel())
        self.block_of.append(-1)
        self._block_map = None
        self._costs.clear()
        self._exact.clear()
        return len(self.names) - 1

    # ----- block gates
    def set_blocks(self, block_segments: list[int], block_of: dict[int, int]) -> None:
        """Mark ``block_segments`` as block gates and each ``segment -> block segment`` of ``block_of``
        as closed with its block (its channels live inside that block's residual branch)."""
        for b in block_segments:
            if not 0 <= b < len(self.sizes) or self.sizes[b] != 1:
                raise ValueError(f"block segment {b} must be an existing segment of one gate")
        for k, b in block_of.items():
            if b not in block_segments or not 0 <= k < len(self.sizes) or k in block_segments:
                raise ValueError(f"segment {k} cannot belong to block segment {b}")
        self.block_segments = sorted(block_segments)
        self.block_of = [block_of.get(k, -1) for k in range(len(self.sizes))]
        self._block_map = None

    @property
    def has_nested_gates(self) -> bool:
        """True when some channel gates sit inside a block-gated branch (effective gates differ from raw)."""
        return any(b >= 0 for b in self.block_of)

    def _map(self) -> Tensor:
        """Per gate: the flat index of the block gate that also closes it, else -1."""
        if self._block_map is None or self._block_map.device != self.scores.device:
            offsets = self.offsets
            parts = [torch.full((size,), offsets[b] if b >= 0 else -1, dtype=torch.int64)
                     for size, b in zip(self.sizes, self.block_of)]
            self._block_map = torch.cat(parts).to(self.scores.device) if parts else torch.zeros(0, dtype=torch.int64)
        return self._block_map

    def effective(self, values: Tensor) -> Tensor:
        """Gates (hard or probabilities) times the gate of the block that contains them.

        With hard gates this is what the extracted network keeps: a channel
        inside a removed block is removed with it.
        """
        if not self.has_nested_gates:
            return values
        m = self._map()
        inside = m >= 0
        return torch.where(inside, values * values[m.clamp(min=0)], values)

    def effective_scores(self, scores: Tensor | None = None) -> Tensor:
        """Scores whose probabilities are the effective probabilities ``p_j * p_block`` (differentiable).

        ``tau * logit(p_j * p_block)`` for channel gates inside a block-gated
        branch, the scores themselves elsewhere. The penalty op then sees every
        channel of a closing block leave the cost, through the same kernels.
        """
        scores = self.scores if scores is None else scores
        if not self.has_nested_gates:
            return scores
        m = self._map()
        idx = torch.nonzero(m >= 0).flatten()
        s = scores.double() / self.tau
        log_p = torch.nn.functional.logsigmoid(s)
        log_eff = (log_p[idx] + log_p[m[idx]]).clamp(max=-1e-300)
        eff = self.tau * (log_eff - torch.log(-torch.expm1(log_eff)))
        return torch.index_put(scores, (idx,), eff.to(scores.dtype))

    @property
    def offsets(self) -> list[int]:
        out, acc = [], 0
        for size in self.sizes:
            out.append(acc)
            acc += size
        return out

    def segment_scores(self, index: int) -> Tensor:
        return self.scores.narrow(0, self.offsets[index], self.sizes[index])

    # ----- cost models
    def set_cost(self, kind: str, cost, exact=None) -> None:
        """Register the cost model of ``kind``: a CostModel or a tensor of per-gate weights.

        ``exact``: where the cost of a hard gate set is not the model's (a lookup table the model is fitted to),
        an object with ``cost(gates) -> float`` (effective 0/1 gates) and ``total`` (every gate open): the budget,
        :meth:`hard_cost` and the report read it; the penalty keeps the differentiable model."""
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"kind must be a non-empty string, got {kind!r}")
        if isinstance(cost, Tensor):
            check_float(cost, "cost")
            if cost.shape != self.scores.shape:
                raise ValueError(f"cost must have shape {tuple(self.scores.shape)} (one entry per gate), "
                                 f"got {tuple(cost.shape)}")
            check_cost_values(cost)
            cost = CostModel.linear_only(cost)
        if not isinstance(cost, CostModel):
            raise TypeError(f"cost must be a CostModel or a tensor, got {type(cost).__name__}")
        if cost.linear.numel() != self.scores.numel():
            raise ValueError(f"the cost model has {cost.linear.numel()} gates, the bank {self.scores.numel()}")
        if exact is not None and not (callable(getattr(exact, "cost", None)) and hasattr(exact, "total")):
            raise TypeError(f"exact must have cost(gates) and total, got {type(exact).__name__}")
        self._costs[kind] = cost.to(self.scores.device)
        self._exact.pop(kind, None)
        if exact is not None:
            self._exact[kind] = exact

    @property
    def cost_kinds(self) -> list[str]:
        kinds = ["channels", *sorted(k for k in self._costs if k != "channels")]
        return [k for k in kinds if k not in self.unavailable]

    def hard_cost(self, kind: str) -> float:
        """The cost ``kind`` of the hard gates (a score > 0 is open): what the extracted network has."""
        return self.exact_cost(kind).cost(self.effective((self.scores.detach() > 0).float()))

    def exact_cost(self, kind: str) -> "ExactCost":
        """The cost ``kind`` of hard gate sets as the budget reads it: ``cost(effective gates) -> float`` and
        ``total``; the ``exact`` lookup registered with :meth:`set_cost`, else the cost model itself."""
        cm = self.cost_model(kind)
        return self._exact.get(kind) or ExactCost(cm)

    def cost_model(self, kind: str = "channels") -> CostModel:
        """The cost model registered under ``kind`` (``channels``: every gate costs 1)."""
        if not isinstance(kind, str):
            raise TypeError(f"cost must be a str, got {type(kind).__name__}")
        if kind in self.unavailable:
            raise ValueError(f"cost {kind!r} is not available for this model: {self.unavailable[kind]}")
        cm = self._costs.get(kind)
        if cm is None:
            if kind != "channels":
                raise ValueError(f"cost must be one of {', '.join(self.cost_kinds)} for this model, got {kind!r} "
                                 "(attach_gates with example inputs registers params and macs)")
            cm = self._costs[kind] = CostModel.channels(self.scores.numel(), self.scores.device)
        if cm.device != self.scores.device:
            cm = self._costs[kind] = cm.to(self.scores.device)
        return cm

    # ----- gates
    def gates(self) -> tuple[Tensor, ...]:
        """Hard gates of every segment, computed with one op call.

        Inside a forward pass of the model, once a PolarizationLoss has armed the
        bank, that one call (``polarprune::gate_bank``) also computes the
        penalty terms, which the loss then takes instead of a second launch.
        """
        if self._active and self._cache is not None:
            return self._cache
        if self._active and self._penalty is not None:
            key, cm, rho, form, t = self._penalty
            gates, terms = functional.gate_bank(self.scores, self.ste, self.tau, cm, rho, form, t)
            self._terms = (key, terms)
        else:
            gates = functional.binary_gate(self.scores, self.ste, self.tau)
        chunks = gates.split(self.sizes)
        if self._active:
            self._cache = chunks
        return chunks

    def arm_penalty(self, key, cost_model: CostModel, rho: float, polar_form: str, t: float) -> None:
        """Compute these penalty terms together with the gates in the following forward passes."""
        if self._penalty is None or self._penalty[0] != key:
            self._penalty = (key, cost_model, float(rho), polar_form, float(t))

    def take_terms(self, key):
        """The penalty terms the last forward pass computed for ``key`` (once), else None."""
        found = self._terms
        self._terms = None
        if found is None or found[0] != key:
            return None
        return found[1]

    def gate(self, index: int) -> Tensor:
        return self.gates()[index]

    def probabilities(self) -> Tensor:
        return torch.sigmoid(self.scores.detach() / self.tau)

    def fusable(self) -> bool:
        """Whether the penalty can be computed on the raw scores, together with the gates."""
        return not self.has_nested_gates

    def _enter(self, module, args) -> None:
        self._cache = None
        self._active = True

    def _exit(self, module, args, output) -> None:
        self._cache = None
        self._active = False

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteGateError` naming the segments whose scores are NaN or inf."""
        raise_if_nonfinite(self.scores.detach(), self.names, self.sizes)

    def extra_repr(self) -> str:
        return f"gates={self.scores.numel()}, segments={len(self.sizes)}, ste={self.ste!r}, tau={self.tau}"

    def __getstate__(self):
        state = super().__getstate__()
        state["_cache"], state["_active"], state["_terms"] = None, False, None
        state["_block_map"] = None
        state["_score_grad_hook"] = None   # a copy has its own parameter; the optimizer installs the hook again
        return state


def check_cost_values(cost: Tensor) -> None:
    """Cost weights must be finite, non-negative and not all zero (reads the values once)."""
    c = cost.detach()
    if not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
        raise ValueError("cost weights must be finite and >= 0")
    if not bool(c.sum() > 0):
        raise ValueError("cost weights must not all be zero")


def raise_if_nonfinite(scores: Tensor, names: list[str], sizes: list[int]) -> None:
    bad = ~torch.isfinite(scores.detach())
    if not bool(bad.any()):
        return
    parts = []
    for name, chunk, size in zip(names, bad.split(sizes), sizes):
        count = int(chunk.sum())
        if count:
            parts.append(f"{name} ({count} of {size})")
    shown = ", ".join(parts[:8]) + (f" and {len(parts) - 8} more" if len(parts) > 8 else "")
    raise NonFiniteGateError(
        f"{int(bad.sum())} gate scores are NaN or inf, in {shown}. Training has diverged: "
        "lower the learning rate or the penalty weight, or resume from an earlier checkpoint."
    )


def find_bank(model: nn.Module) -> GateBank | None:
    """The gate bank bound to ``model`` (or the model itself if it is a bank), else None."""
    if isinstance(model, GateBank):
        return model
    for m in model.modules():
        if isinstance(m, GateBank):
            return m
    return None


def bind_gates(model: nn.Module, ste: str | None = None, tau: float | None = None,
               groups: Iterable[Iterable[str]] | None = None) -> GateBank:
    """Gather every gate module of ``model`` into one :class:`GateBank`.

    The bank is registered as the submodule ``polarprune_bank`` of ``model``
    and computes all gates once per forward pass of ``model``. Each module's
    current scores become its segment's initial scores. ``groups`` lists names
    of gate modules that share one segment (equal channel counts required;
    the first module's scores are used). ``ste``/``tau`` default to the
    modules' own settings, which must then agree.

    Bind before creating the optimizer: the modules' own ``gate_scores``
    parameters are replaced by the bank's ``scores``.
    """
    found = gate_modules(model)
    if not found:
        raise ValueError("model has no gate modules (ChannelGate, GatedBatchNorm2d) to bind")
    if find_bank(model) is not None:
        raise ValueError("model already has a gate bank; gates are bound once")
    settings = {(m.ste, m.tau) for _, m in found}
    if ste is None or tau is None:
        if len(settings) > 1 and (ste is None or tau is None):
            raise ValueError(f"gate modules disagree on (ste, tau): {sorted(settings)}; "
                             "pass ste= and tau= to bind_gates")
        s0, t0 = next(iter(settings))
        ste = s0 if ste is None else ste
        tau = t0 if tau is None else tau
    by_name = dict(found)
    shared: dict[str, str] = {}
    for group in groups or ():
        group = list(group)
        for name in group:
            if name not in by_name:
                raise ValueError(f"groups names {name!r}, which is not a gate module of the model")
            if name in shared:
                raise ValueError(f"groups names {name!r} twice")
            if by_name[name].num_gates != by_name[group[0]].num_gates:
                raise ValueError(f"channel-count mismatch in groups: {name!r} has {by_name[name].num_gates} "
                                 f"gates, {group[0]!r} has {by_name[group[0]].num_gates}")
            shared[name] = group[0]
    bank = GateBank(ste=ste, tau=tau)
    device = next((m.gate_scores.device for _, m in found), None)
    index: dict[str, int] = {}
    for name, m in found:
        leader = shared.get(name, name)
        if leader not in index:
            index[leader] = bank.add_segment(leader, by_name[leader].gate_scores.detach())
        index[name] = index[leader]
    if device is not None:
        bank.to(device)
    for name, m in found:
        m._bind(bank, index[name])
    install_bank(model, bank)
    return bank


def install_bank(model: nn.Module, bank: GateBank) -> None:
    """Register ``bank`` as ``model.polarprune_bank`` and the hooks that share gates within a forward pass."""
    model.add_module(BANK_ATTR, bank)
    bank._hooks = [
        model.register_forward_pre_hook(bank._enter),
        model.register_forward_hook(bank._exit, always_call=True),
    ]


def remove_bank(model: nn.Module) -> None:
    """Remove the gate bank and its hooks from ``model`` (e.g. a deep copy being extracted)."""
    bank = model._modules.pop(BANK_ATTR, None)
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key, fn in list(hooks.items()):
            if isinstance(getattr(fn, "__self__", None), GateBank):
                del hooks[key]
                model._forward_hooks_always_called.pop(key, None)
    if bank is not None:
        bank._hooks = []


def flat_gate_view(obj) -> tuple[Tensor, list[str], list[int], float, GateBank | None]:
    """(scores, segment names, sizes, tau, bank) of a bank, a model with a bank or loose gate modules."""
    if isinstance(obj, GateMixin) and obj.bank is None:
        return obj.gate_scores, ["gate"], [obj.num_gates], obj.tau, None
    if not isinstance(obj, nn.Module):
        raise TypeError(f"expected a model with gates, a GateBank or a gate module, got {type(obj).__name__}")
    bank = obj.bank if isinstance(obj, GateMixin) else find_bank(obj)
    if bank is not None:
        return bank.scores, list(bank.names), list(bank.sizes), bank.tau, bank
    found = gate_modules(obj)
    if not found:
        raise ValueError("model has no gates: add ChannelGate/GatedBatchNorm2d modules or attach gates first")
    taus = {m.tau for _, m in found}
    if len(taus) > 1:
        raise ValueError(f"gate modules disagree on tau: {sorted(taus)}; bind them with bind_gates(model, tau=...)")
    scores = torch.cat([m.gate_scores for _, m in found])
    return scores, [n for n, _ in found], [m.num_gates for _, m in found], taus.pop(), None


class ExactCost:
    """A cost model read as the budget reads it: the float cost of a hard gate set, and the total."""

    def __init__(self, model: CostModel):
        self.model = model
        self.total = model.total

    def cost(self, gates: Tensor) -> float:
        return float(self.model.cost(gates.to(self.model.device, torch.float32)))
