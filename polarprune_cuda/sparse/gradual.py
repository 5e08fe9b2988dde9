"""The shared machinery of gradual unstructured pruning (fggp.py's pruners): the cubic density schedule,
ERK densities, and GradualPruner (masks, the update bookkeeping, resuming). See fggp.py's docstring for the
algorithm, exact to the FGGP authors' code."""
from __future__ import annotations

import math
import warnings
from decimal import Decimal

import torch
from torch import Tensor, nn

from ..ops.common import is_number

STATE_FORMAT = 1
STARTS = ("dense", "erk50")
FIRST_UPDATE_WEIGHTS = ("forward", "stepped")


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def check_fraction(value, name: str) -> float:
    if not is_number(value) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _percent(fraction: float) -> float:
    """``100 * fraction`` as the decimal ``fraction`` is written (0.9 -> 90.0, exactly)."""
    return float(Decimal(repr(float(fraction))) * 100)


def cubic_density(t: int, end: int, target_sparsity: float, initial_density: float = 1.0) -> float:
    """The authors' cubic schedule, in percent as their code computes it, for ``t <= end`` (then the target):

    ``0.01 tr + 0.01 (ir - tr) (1 - t / end)^3``, ``tr = 100 (1 - target_sparsity)``, ``ir = 100 initial_density``.
    The percentages are those a user would pass on their command line (``tr`` is 10.0 for a target of 0.9,
    where ``1 - 0.9`` in floats is 0.09999999999999998), so ``floor(N (1 - d_t) - Z)`` removes what theirs does.
    """
    target_ratio = float((1 - Decimal(repr(float(target_sparsity)))) * 100)
    initial_ratio = _percent(initial_density)
    frac = min(max(t / end, 0.0), 1.0)
    return target_ratio * 0.01 + 0.01 * (initial_ratio - target_ratio) * (1 - frac) ** 3


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel layer densities with overall ``density`` over the weights of ``shapes``.

    As the authors' code (after GraNet) computes them: the density of a layer is ``eps * sum(shape) /
    prod(shape)``; while the largest of these exceeds 1, the layer(s) with the largest raw ratio become dense
    (one step at a time) and ``eps`` is recomputed from the remaining budget.
    """
    ratio = _percent(density)
    dense: set[str] = set()
    while True:
        divisor = rhs = 0.0
        raw: dict[str, float] = {}
        for name, shape in shapes.items():
            n_param = math.prod(shape)
            if name in dense:
                rhs -= n_param * (1 - ratio * 0.01)
            else:
                rhs += n_param * ratio * 0.01
                raw[name] = sum(shape) / n_param
                divisor += raw[name] * n_param
        if not raw:
            break
        eps = rhs / divisor
        max_raw = max(raw.values())
        if max_raw * eps <= 1:
            break
        dense.update(n for n, r in raw.items() if r == max_raw)
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


class GradualPruner:
    """Schedule, masks and bookkeeping shared by FGGP, GMP and the annealed variant; subclasses choose weights.

    Args:
        model: the network (its Conv2d/Linear weights are pruned in place).
        target_sparsity: final fraction of Conv2d/Linear weights and biases that are zero, in (0, 1).
        total_steps: training iterations T; updates stop after ``int(end_fraction * T)``.
        update_every: iterations between mask updates (Delta; 2000 at batch 64 in the paper).
        start: ``dense`` (s_i = 1) or ``erk50`` (a random ERK mask at 50% density, s_i = 0.5).
        seed: seed of the ``erk50`` mask.
        end_fraction: where the schedule ends, 0.8 in the paper.
        prune_first_conv: whether the first Conv2d (in module order) is prunable; FGGP's script keeps it
            dense, ``main.py`` (GMP) prunes it.
        first_update_weights: the magnitudes the first update ranks: ``forward`` (the weights as the forward
            pass saw them, as every later update does; FGGP's script, whose layers carry masks from the
            start) or ``stepped`` (the weights after this step's optimizer update; ``main.py``, whose layers
            get their masks at the first update).
    """

    method = "base"

    def __init__(self, model: nn.Module, target_sparsity: float, total_steps: int, update_every: int = 2000,
                 start: str = "dense", seed: int = 0, end_fraction: float = 0.8, prune_first_conv: bool = False,
                 first_update_weights: str = "forward"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.target_sparsity = check_fraction(target_sparsity, "target_sparsity")
        self.total_steps = _check_positive_int(total_steps, "total_steps")
        self.update_every = _check_positive_int(update_every, "update_every")
        self.end_fraction = check_fraction(end_fraction, "end_fraction")
        if start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
        if not isinstance(prune_first_conv, bool):
            raise TypeError(f"prune_first_conv must be a bool, got {prune_first_conv!r}")
        if first_update_weights not in FIRST_UPDATE_WEIGHTS:
            raise ValueError(f"first_update_weights must be one of {', '.join(FIRST_UPDATE_WEIGHTS)}, "
                             f"got {first_update_weights!r}")
        self.start = start
        self.seed = seed
        self.prune_first_conv = prune_first_conv
        self.first_update_weights = first_update_weights
        self.end_step = int(self.end_fraction * self.total_steps)
        if self.end_step < self.update_every:
            raise ValueError(
                f"the schedule ends at step int({self.end_fraction} * total_steps) = {self.end_step}, before the "
                f"first update at step update_every = {self.update_every}: lower update_every or raise total_steps")
        self.initial_density = 1.0 if start == "dense" else 0.5
        self.final_density = 1.0 - self.target_sparsity
        if self.final_density >= self.initial_density:
            raise ValueError(f"target_sparsity={target_sparsity} is not above the starting sparsity of "
                             f"start={start!r} ({1 - self.initial_density})")
        layers = _layers(model)
        first_conv = next((n for n, m in layers if isinstance(m, nn.Conv2d)), None)
        fixed = set() if prune_first_conv else {first_conv}
        self.model = model
        self.counted = [m.weight for _, m in layers] + [m.bias for _, m in layers if m.bias is not None]
        self.fixed_names = [n for n, _ in layers if n in fixed]
        self.fixed_weights = [m.weight for n, m in layers if n in fixed]
        self.names = [n for n, _ in layers if n not in fixed]
        self.params = [m.weight for n, m in layers if n not in fixed]
        if not self.params:
            raise ValueError("model has no prunable Conv2d/Linear weight (the first Conv2d is pruned only with "
                             "prune_first_conv=True)")
        self.N = sum(p.numel() for p in self.counted)
        self.masks = [torch.ones_like(p, dtype=torch.bool) for p in self.params]
        # masks of the weights that are never pruned (the first conv under erk50), None where there is none
        self.fixed_masks: list[Tensor | None] = [None] * len(self.fixed_weights)
        self._float_masks: list[Tensor] | None = None
        self.steps_taken = 0
        self.updates: list[dict] = []
        self._snapshot: list[Tensor] | None = None
        self._hook = model.register_forward_pre_hook(self._remember_weights)
        self._check_schedule()
        if start == "erk50":
            self._erk_mask(layers)
        self.apply_masks()

    # ----- schedule
    def update_due(self, t: int) -> bool:
        return t % self.update_every == 0 and t <= self.end_step

    def density_at(self, t: int) -> float:
        return cubic_density(t, self.end_step, self.target_sparsity, self.initial_density)

    def final_update_density(self) -> float:
        """The density target of the last update (the target itself when int(0.8 T) is a multiple of Delta)."""
        return self.density_at(self.end_step - self.end_step % self.update_every)

    def _check_schedule(self) -> None:
        if self.end_step % self.update_every:
            warnings.warn(
                f"int({self.end_fraction} * total_steps) = {self.end_step} is not a multiple of update_every="
                f"{self.update_every}: the last update (step {self.end_step - self.end_step % self.update_every}) "
                f"targets density {self.final_update_density():.6g}, not {self.final_density:.6g}", stacklevel=3)

    # ----- masks
    def _erk_mask(self, layers) -> None:
        """ERK densities over every Conv2d/Linear weight; one Bernoulli draw per entry, layers in module order."""
        dens = erk_densities({n: tuple(m.weight.shape) for n, m in layers}, self.initial_density)
        g = torch.Generator().manual_seed(self.seed)
        drawn = {n: torch.rand(m.weight.shape, generator=g) < dens[n] for n, m in layers}
        self.masks = [drawn[n].to(p.device) for n, p in zip(self.names, self.params)]
        self.fixed_masks = [drawn[n].to(w.device) for n, w in zip(self.fixed_names, self.fixed_weights)]
        self._float_masks = None

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned weights (their optimizer state may move them; this puts them back to exact zero)."""
        weights = self.params + [w for w, m in zip(self.fixed_weights, self.fixed_masks) if m is not None]
        masks = self.masks + [m for m in self.fixed_masks if m is not None]
        if self._float_masks is None or any(m.device != p.device or m.dtype != p.dtype
                                            for m, p in zip(self._float_masks, weights)):
            self._float_masks = [m.to(p.device, p.dtype) for m, p in zip(masks, weights)]
        torch._foreach_mul_([p.data for p in weights], self._float_masks)

    def _remember_weights(self, module, args) -> None:
        """Forward pre-hook: on iterations that end with an update, keep |w| as the forward pass sees it."""
        if self.update_due(self.steps_taken + 1) and not self._ranks_stepped_weights(self.steps_taken + 1):
            self._snapshot = [p.detach().abs() for p in self.params + self.fixed_weights]

    def _ranks_stepped_weights(self, t: int) -> bool:
        return self.first_update_weights == "stepped" and t == self.update_every

    # ----- the step
    @torch.no_grad()
    def step(self) -> dict | None:
        """Call once per iteration, after ``optimizer.step()``: applies the masks, updates them when due.

        Returns the update's record (step, density target, k, ...) on update iterations, else None.
        """
        self.steps_taken += 1
        record = None
        if self.update_due(self.steps_taken):
            record = self._update()
        self.apply_masks()
        return record

    def _stepped_weights(self) -> list[Tensor]:
        """|w| after this step's optimizer update, the masks applied (entries already pruned stay zero)."""
        masks = self.masks + self.fixed_masks
        return [(p.detach() * m if m is not None else p.detach()).abs()
                for p, m in zip(self.params + self.fixed_weights, masks)]

    def _update(self) -> dict:
        d_t = self.density_at(self.steps_taken)
        if self._ranks_stepped_weights(self.steps_taken):
            self._snapshot = self._stepped_weights()
        if self._snapshot is None:
            raise RuntimeError("no forward pass of the model was seen before this update; call pruner.step() "
                               "once per training step of the model the pruner was built on, after optimizer.step()")
        # Z counts zeros of every Conv2d/Linear weight as the ranking sees them (masked, before this step's update)
        Z = int(sum(int((s == 0).sum()) for s in self._snapshot))
        k = math.floor(self.N * (1 - d_t) - Z)
        R = self.N - Z
        record = {"step": self.steps_taken, "density_target": d_t, "N": self.N, "Z": Z, "R": R, "k": max(k, 0)}
        if k > 0:
            active = torch.cat([m.flatten() for m in self.masks])
            idx = torch.nonzero(active).flatten()
            grads = self._flat_grads()[idx].abs()
            mags = torch.cat([s.flatten() for s in self._snapshot[:len(self.params)]])[idx]
            chosen = idx[self.select(k, R, grads, mags)]
            active[chosen] = False
            self._set_flat_masks(active)
            record["pruned"] = int(chosen.numel())
        self._snapshot = None
        self.updates.append(record)
        return record

    def _flat_grads(self) -> Tensor:
        grads = []
        for n, p in zip(self.names, self.params):
            if p.grad is None:
                raise RuntimeError(f"{n}.weight has no gradient at this update: call pruner.step() after "
                                   "loss.backward() and optimizer.step(), before zero_grad()")
            grads.append(p.grad.detach().flatten())
        return torch.cat(grads)

    def _set_flat_masks(self, flat: Tensor) -> None:
        out, i = [], 0
        for p in self.params:
            out.append(flat[i:i + p.numel()].view(p.shape).clone())
            i += p.numel()
        self.masks = out
        self._float_masks = None

    def select(self, k: int, R: int, grads: Tensor, mags: Tensor) -> Tensor:
        """Positions (into the active entries) of the ``k`` weights to prune now."""
        raise NotImplementedError

    # ----- reporting and export
    def sparsity(self) -> dict:
        """``1 - nonzeros / total`` over Conv2d/Linear weights and biases (the paper's measure)."""
        nonzero = int(sum(int((p != 0).sum()) for p in self.counted))
        return {"sparsity": 1 - nonzero / self.N, "nonzeros": nonzero, "total": self.N,
                "prunable_density": float(sum(int(m.sum()) for m in self.masks) / sum(m.numel() for m in self.masks))}

    def export(self) -> dict[str, Tensor]:
        """The model's state_dict with the masks applied (exact zeros), on the CPU."""
        self.apply_masks()
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    # ----- resuming
    def state_dict(self) -> dict:
        # "t" holds the steps taken (the key of checkpoint format 1)
        return {"format": STATE_FORMAT, "method": self.method, "t": self.steps_taken, "config": self._config(),
                "masks": [m.cpu() for m in self.masks], "updates": list(self.updates),
                "fixed_masks": [m.cpu() if m is not None else None for m in self.fixed_masks]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("state is not a pruner state_dict of this version")
        if state.get("method") != self.method or state.get("config") != self._config():
            raise ValueError(f"state was written by {state.get('method')} with {state.get('config')}, "
                             f"this pruner is {self.method} with {self._config()}")
        if [tuple(m.shape) for m in state["masks"]] != [tuple(p.shape) for p in self.params]:
            raise ValueError("state's masks do not fit this model's prunable weights")
        fixed = state.get("fixed_masks", [None] * len(self.fixed_weights))
        if len(fixed) != len(self.fixed_weights) or any(
                m is not None and tuple(m.shape) != tuple(w.shape) for m, w in zip(fixed, self.fixed_weights)):
            raise ValueError("state's masks of the never-pruned weights do not fit this model")
        self.steps_taken = int(state["t"])
        self.masks = [m.to(p.device, torch.bool) for m, p in zip(state["masks"], self.params)]
        self.fixed_masks = [m.to(w.device, torch.bool) if m is not None else None
                            for m, w in zip(fixed, self.fixed_weights)]
        self.updates = list(state["updates"])
        self._float_masks = None
        self.apply_masks()

    def _config(self) -> dict:
        return {"target_sparsity": self.target_sparsity, "total_steps": self.total_steps,
                "update_every": self.update_every, "start": self.start, "seed": self.seed,
                "end_fraction": self.end_fraction, "prune_first_conv": self.prune_first_conv,
                "first_update_weights": self.first_update_weights}

    def remove(self) -> None:
        """Detach the pruner from the model (its forward pre-hook); the zeros stay."""
        self._hook.remove()

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({cfg}, steps_taken={self.steps_taken})"
