"""PolarizationLoss: density target plus polarization over all gates at once, and gate_stats.

The penalty is this project's formulation (docs/DESIGN.md): with gate
probabilities ``p_j = sigmoid(s_j / tau)`` and the bank's exact cost model
of the chosen unit,

    density  d = cost(p) / cost(1)      (channels: mean_j p_j; params and MACs:
                                         linear plus bilinear terms, a conv's cost
                                         the product of its input and output densities;
                                         a tensor of weights w: sum_j w_j p_j / sum_j w_j)
    penalty    = target_weight * (d - (1 - target_sparsity))^2
               + polarization_weight * R(p)

with ``R`` the Zhuang et al. (NeurIPS 2020) polarizer over all gates,
``(t * sum_j p_j - sum_j |p_j - mean(p)|) / n``, or the bimodal
``mean_j 4 p_j (1 - p_j)``. Value and gradient come from the fused
``polarprune::gate_penalty`` op.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..defaults import default_cost
from ..ops.common import POLAR_FORMS, check_float, check_target_sparsity, is_number
from ..ops.cost import CostModel
from ..ops.gate_penalty import gate_penalty
from .bank import GateBank, check_cost_values, flat_gate_view, raise_if_nonfinite

Schedule = Callable[[int], "float | tuple[float, float]"]


class PenaltyValue(torch.Tensor):
    """A loss tensor that checks the gate scores when its value is read.

    Behaves as an ordinary tensor (autograd, arithmetic). ``item()``,
    ``float()``, ``int()``, ``tolist()`` and ``numpy()`` first read the number of
    non-finite gate scores the penalty op counted on the device, and raise
    :class:`~polarprune_cuda.NonFiniteGateError` naming the segments if it is
    not zero. The check costs nothing until the value is read, so training
    steps gain no host synchronisation. Results of arithmetic with a
    PenaltyValue (``task_loss + penalty``) carry the same check.
    """

    _pp_checks: tuple = ()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        checks = []
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, PenaltyValue):
                checks.extend(c for c in a._pp_checks if c not in checks)
        if func in _READS:
            for check in checks:
                check()
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if isinstance(out, Tensor) and not isinstance(out, PenaltyValue) and out.dim() == 0:
            out = out.as_subclass(PenaltyValue)
        if isinstance(out, PenaltyValue):
            out._pp_checks = tuple(checks)
        return out

    def __format__(self, spec: str) -> str:
        if self.dim() == 0:
            return format(self.item(), spec)
        return torch.Tensor.__format__(self.as_subclass(Tensor), spec)

    def __repr__(self, *, tensor_contents=None):
        with torch._C.DisableTorchFunctionSubclass():
            return torch.Tensor.__repr__(self.as_subclass(Tensor))


_READS = {Tensor.item, Tensor.__float__, Tensor.__int__, Tensor.tolist, Tensor.numpy, Tensor.__bool__}


class _NonFiniteCheck:
    """Reads the device-side count once; on a nonzero count, names the bad segments."""

    def __init__(self, count: Tensor, scores: Tensor, names, sizes):
        self.count, self.scores, self.names, self.sizes = count, scores, names, sizes

    def __call__(self) -> None:
        with torch._C.DisableTorchFunctionSubclass():
            bad = float(self.count) > 0
        if bad:
            raise_if_nonfinite(self.scores, self.names, self.sizes)
            from .bank import NonFiniteGateError
            raise NonFiniteGateError("gate scores were NaN or inf when the penalty was computed")


def ramp(warmup_steps: int = 0, ramp_steps: int = 0) -> Schedule:
    """A penalty-weight schedule: 0 for ``warmup_steps``, then linear to 1 over ``ramp_steps``."""
    for name, v in (("warmup_steps", warmup_steps), ("ramp_steps", ramp_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return 0.0
        if ramp_steps == 0:
            return 1.0
        return min(1.0, (step - warmup_steps + 1) / ramp_steps)

    return schedule


class PolarizationLoss(nn.Module):
    """Density target plus polarization over every gate of a model, in one fused op.

    Args:
        target_sparsity: fraction of the cost to remove, in [0, 1); the density
            target is ``rho = 1 - target_sparsity``.
        cost: ``"channels"`` (each gate weighs 1), another kind registered on the
            model's gate bank (``"params"``, ``"macs"``), or a tensor with one
            non-negative weight per gate. Default (None): ``"macs"`` where the
            gates know them, else ``"channels"`` (:mod:`polarprune_cuda.defaults`).
        polarization: ``"bimodal"`` (mean 4 p (1 - p), the default) or ``"zhuang"``
            ((t * ||p||_1 - ||p - mean(p)||_1) / n).
        t: the Zhuang polarizer's t (about 1.0-1.2).
        target_weight, polarization_weight: weights of the two terms.
        schedule: optional ``step -> multiplier`` (or ``(target_mult, polar_mult)``)
            applied to the weights, e.g. :func:`ramp`; ``step`` is the ``step=``
            argument of the call, else a counter advanced on each call in training mode.
        guard: return a :class:`PenaltyValue` that raises on NaN/inf gate scores
            when its value is read (no extra synchronisation).
        fuse: with a gate bank, compute the penalty terms in the same op call as
            the gates during the model's forward pass (from the second call on),
            instead of a separate launch.

    Call it with a model whose gates are bound (or loose gate modules, or a
    :class:`GateBank`); it returns a 0-dim loss to add to the task loss. The
    last terms (density, target term, polar term) stay on the device in
    ``last_terms``; :meth:`terms` reads them.
    """

    def __init__(
        self,
        target_sparsity: float,
        cost: str | Tensor | None = None,
        polarization: str = "bimodal",
        t: float = 1.0,
        target_weight: float = 20.0,
        polarization_weight: float = 0.1,
        schedule: Schedule | None = None,
        guard: bool = True,
        fuse: bool = True,
    ):
        super().__init__()
        check_target_sparsity(target_sparsity)
        if polarization not in POLAR_FORMS:
            raise ValueError(f"polarization must be one of {', '.join(POLAR_FORMS)}, got {polarization!r}")
        for name, v in (("t", t), ("target_weight", target_weight), ("polarization_weight", polarization_weight)):
            if not is_number(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be a callable step -> multiplier, got {type(schedule).__name__}")
        if isinstance(cost, Tensor):
            check_float(cost, "cost")
            if cost.dim() != 1:
                raise ValueError(f"cost must be a 1-D tensor (one weight per gate), got shape {tuple(cost.shape)}")
            check_cost_values(cost)
            self._tensor_cost = CostModel.linear_only(cost)
            self.cost = "tensor"
        elif isinstance(cost, CostModel):
            self._tensor_cost = cost
            self.cost = "model"
        elif cost is None or isinstance(cost, str):
            self._tensor_cost = None
            self.cost = cost
        else:
            raise TypeError(f"cost must be a str (channels, params, macs), a tensor or a CostModel, "
                            f"got {type(cost).__name__}")
        self.target_sparsity = float(target_sparsity)
        self.polarization = polarization
        self.t = float(t)
        self.target_weight = float(target_weight)
        self.polarization_weight = float(polarization_weight)
        self.schedule = schedule
        self.guard = guard
        self.fuse = fuse
        self.step = 0
        self.last_terms: Tensor | None = None

    @property
    def rho(self) -> float:
        return 1.0 - self.target_sparsity

    def cost_model(self, gates) -> CostModel:
        """The cost model this loss uses for ``gates`` (a model, bank or gate module)."""
        scores, _, _, _, bank = flat_gate_view(gates)
        return self._cost_for(scores, bank)

    def _cost_for(self, scores: Tensor, bank: GateBank | None) -> CostModel:
        if self._tensor_cost is not None:
            if self._tensor_cost.linear.numel() != scores.numel():
                raise ValueError(f"cost has {self._tensor_cost.linear.numel()} weights but the model has "
                                 f"{scores.numel()} gates")
            if self._tensor_cost.device != scores.device:
                self._tensor_cost = self._tensor_cost.to(scores.device)
            return self._tensor_cost
        kind = default_cost(bank) if self.cost is None else self.cost
        if bank is not None:
            return bank.cost_model(kind)
        if kind != "channels":
            raise ValueError(f"cost={self.cost!r} needs a gate bank with that cost registered "
                             "(bind_gates / attach_gates); loose gate modules only know 'channels'")
        return CostModel.channels(scores.numel(), scores.device)

    def weights(self, step: int) -> tuple[float, float]:
        """(target_weight, polarization_weight) after the schedule at ``step``."""
        if self.schedule is None:
            return self.target_weight, self.polarization_weight
        mult = self.schedule(step)
        a, b = (mult, mult) if not isinstance(mult, tuple) else mult
        return self.target_weight * float(a), self.polarization_weight * float(b)

    def arm(self, gates) -> None:
        """Have the model's gate bank compute this penalty with the gates from the next forward pass on.

        Calling the loss does this too; arming first makes every step, the first
        included, take the fused path (what a resumed run must match).
        """
        scores, _, _, _, bank = flat_gate_view(gates)
        if bank is not None and self.fuse and bank.fusable():
            cm = self._cost_for(scores, bank)
            bank.arm_penalty((id(cm), self.rho, self.polarization, self.t), cm, self.rho, self.polarization, self.t)

    def forward(self, gates, step: int | None = None) -> Tensor:
        scores, names, sizes, tau, bank = flat_gate_view(gates)
        if step is None:
            step = self.step
            if self.training:
                self.step += 1
        target_weight, polar_weight = self.weights(step)
        cm = self._cost_for(scores, bank)
        terms = None
        if bank is not None and self.fuse and bank.fusable():
            key = (id(cm), self.rho, self.polarization, self.t)
            bank.arm_penalty(key, cm, self.rho, self.polarization, self.t)
            terms = bank.take_terms(key)
        if terms is not None:   # computed with the gates, in the model's forward pass
            loss = target_weight * terms[1] + polar_weight * terms[2]
        else:
            # channel gates inside a block-gated branch count through p_j * p_block
            effective = scores if bank is None else bank.effective_scores(scores)
            loss, terms = gate_penalty(effective, cm, tau, self.rho, target_weight, polar_weight,
                                       self.polarization, self.t)
        self.last_terms = terms.detach()
        if not self.guard or torch.compiler.is_compiling():
            return loss
        out = loss.as_subclass(PenaltyValue)
        out._pp_checks = (_NonFiniteCheck(terms[3], scores.detach(), names, sizes),)
        return out

    def terms(self) -> dict[str, float]:
        """The last call's density, target term and polar term (reads them from the device)."""
        if self.last_terms is None:
            raise RuntimeError("the loss has not been computed yet")
        d, target, polar, nonfinite = self.last_terms.tolist()
        return {"density": d, "target_term": target, "polar_term": polar, "nonfinite": int(nonfinite)}

    def extra_repr(self) -> str:
        return (f"target_sparsity={self.target_sparsity}, cost={self.cost!r}, polarization={self.polarization!r}, "
                f"t={self.t}, target_weight={self.target_weight}, polarization_weight={self.polarization_weight}")


def gate_stats(model, cost: "str | Tensor | CostModel | None" = None, margin: float = 0.45) -> dict:
    """Gate statistics of a model (or bank, or gate module); reads values from the device.

    Returns ``density`` (the cost of the hard gates over the cost with every
    gate open, in the unit of ``cost``: by default MACs where the gates know
    them, else channels, :mod:`polarprune_cuda.defaults`), ``soft_density`` (the same with
    probabilities, what the loss sees), ``polarized`` (fraction of gates with
    ``|p - 0.5| > margin``), ``open`` and ``num_gates``, and ``layers``: segment
    name -> {"open", "total"}. Raises NonFiniteGateError if a score is NaN or inf.
    """
    if not 0 < margin < 0.5:
        raise ValueError(f"margin must be in (0, 0.5), got {margin!r}")
    scores, names, sizes, tau, bank = flat_gate_view(model)
    s = scores.detach().float()
    raise_if_nonfinite(s, names, sizes)
    if isinstance(cost, Tensor):
        if cost.shape != s.shape:
            raise ValueError(f"cost must have shape {tuple(s.shape)}, got {tuple(cost.shape)}")
        cm = CostModel.linear_only(cost.to(s.device))
    elif isinstance(cost, CostModel):
        cm = cost.to(s.device)
    elif bank is not None:
        cm = bank.cost_model(default_cost(bank) if cost is None else cost)
    elif cost in (None, "channels"):
        cm = CostModel.channels(s.numel(), s.device)
    else:
        raise ValueError(f"cost={cost!r} needs a gate bank with that cost registered")
    g = (s > 0).float()
    p = torch.sigmoid(s / tau)
    if bank is not None:   # a channel inside a closed block is closed with it
        g_eff, p_eff = bank.effective(g), bank.effective(p)
    else:
        g_eff, p_eff = g, p
    layers = {name: {"open": int(c.sum()), "total": size} for name, c, size in zip(names, g.split(sizes), sizes)}
    return {
        "num_gates": s.numel(),
        "open": int(g.sum()),
        "density": float(cm.density(g_eff)),
        "soft_density": float(cm.density(p_eff)),
        "polarized": float(((p - 0.5).abs() > margin).float().mean()),
        "layers": layers,
    }
