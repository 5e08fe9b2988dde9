"""Gradual unstructured pruning: FGGP (gradient first, magnitude next) and its baselines GMP and annealed.

FGGP follows Zhu, Bezek and Goksel, "FGGP: Fixed-Rate Gradient-First
Gradual Pruning" (arXiv 2411.05500), as their public code does it
(``main_proposed_class_schedule_cifar.py``; GMP as ``main.py`` does it):

* prunable: every Conv2d and Linear weight except the first Conv2d (in module
  order; GMP prunes it too, as ``main.py``'s default ``--prune-conv1 True``
  does); biases and BatchNorm are never pruned; selection is global;
* every ``update_every`` steps while ``t <= int(0.8 * total_steps)``, the
  density target is the cubic schedule, computed in percent as the authors do:
  ``d_t = 0.01 tr + 0.01 (ir - tr) (1 - t / int(0.8 T))^3`` with
  ``tr = 100 (1 - target)`` (10.0 for 0.9, taken from the decimal the target is
  written as) and ``ir`` 100 (dense start) or 50 (``erk50``);
* at an update, ``N`` counts every Conv2d/Linear weight and bias, ``Z`` the
  entries of those weights equal to zero, ``k = floor(N (1 - d_t) - Z)``
  weights go, ``R = N - Z``. Gradient first: the ``floor(select_ratio * R)`` active
  prunable weights with the smallest |gradient| of this mini-batch are
  candidates; magnitude next: of those, the ``k`` with the smallest |weight|
  (as of the last forward pass, before this step's update) are pruned.
  ``select_ratio = 0.5`` (the paper's rho). Masks are permanent. GMP's first update ranks
  the weights after this step's optimizer update (``main.py`` puts no masks on
  the layers before that update), every later one as the forward pass saw them;
* ``erk50``: Erdos-Renyi-Kernel densities over every Conv2d and Linear weight
  (the first conv included), one Bernoulli draw per entry from a generator
  seeded with ``seed``, in module order.

Use it in any loop, after the optimizer::

    pruner = pp.FGGP(model, target_sparsity=0.9, total_steps=epochs * len(loader))
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        pruner.step()          # applies the masks; updates them when one is due

``GMP`` (magnitude only) and ``AnnealedPruner`` (magnitude first, gradient
next, with a cosine-decayed candidate rate, as in GraNet) share the schedule
and the bookkeeping. Unstructured zeros make a model smaller to store, not
faster on dense kernels.
"""
from __future__ import annotations

import io
import math
import warnings
from decimal import Decimal

import torch
from torch import Tensor, nn

STATE_FORMAT = 1
STARTS = ("dense", "erk50")
FIRST_UPDATE_WEIGHTS = ("forward", "stepped")


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _check_fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value < 1:
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
        self.target_sparsity = _check_fraction(target_sparsity, "target_sparsity")
        self.total_steps = _check_positive_int(total_steps, "total_steps")
        self.update_every = _check_positive_int(update_every, "update_every")
        self.end_fraction = _check_fraction(end_fraction, "end_fraction")
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


class FGGP(GradualPruner):
    """Fixed-rate gradient-first gradual pruning: the ``floor(select_ratio * R)`` smallest |grad| are candidates,
    of which the ``k`` smallest |w| are pruned (see the module docstring)."""

    method = "fggp"

    def __init__(self, model: nn.Module, target_sparsity: float, total_steps: int, update_every: int = 2000,
                 select_ratio: float = 0.5, start: str = "dense", seed: int = 0, end_fraction: float = 0.8,
                 prune_first_conv: bool = False, first_update_weights: str = "forward"):
        self.select_ratio = _check_fraction(select_ratio, "select_ratio")
        super().__init__(model, target_sparsity, total_steps, update_every, start, seed, end_fraction,
                         prune_first_conv, first_update_weights)

    def _check_schedule(self) -> None:
        super()._check_schedule()
        # the guard floor(select_ratio * R) >= k, if every update meets its target: d_t >= (1 - select_ratio) d_prev
        prev = self.initial_density
        for t in range(self.update_every, self.end_step + 1, self.update_every):
            d = self.density_at(t)
            if d < (1 - self.select_ratio) * prev - 1e-12:
                raise ValueError(
                    f"update_every={self.update_every} is too coarse for this schedule: at step {t} the density "
                    f"must fall from {prev:.4f} to {d:.4f}, more than select_ratio={self.select_ratio} of the "
                    "remaining weights can supply; lower update_every or the target sparsity")
            prev = d

    def select(self, k, R, grads, mags):
        m = math.floor(self.select_ratio * R)
        if m < k or m > grads.numel():
            raise RuntimeError(f"FGGP guard: floor(select_ratio * R) = {m} candidates for k = {k} removals "
                               f"among {grads.numel()} active prunable weights")
        cand = torch.topk(grads, m, largest=False, sorted=False).indices
        return cand[torch.topk(mags[cand], k, largest=False, sorted=False).indices]

    def _config(self) -> dict:
        return super()._config() | {"select_ratio": self.select_ratio}


class GMP(GradualPruner):
    """Gradual magnitude pruning (Zhu and Gupta) on the same cubic schedule: the ``k`` smallest |w| go.

    As the authors' ``main.py`` runs it: the first conv is prunable (its ``--prune-conv1`` defaults to True),
    and the first update ranks the weights after this step's optimizer update. ``prune_first_conv=False,
    first_update_weights="forward"`` gives GMP under FGGP's own rules instead."""

    method = "gmp"

    def __init__(self, model: nn.Module, target_sparsity: float, total_steps: int, update_every: int = 2000,
                 start: str = "dense", seed: int = 0, end_fraction: float = 0.8, prune_first_conv: bool = True,
                 first_update_weights: str = "stepped"):
        super().__init__(model, target_sparsity, total_steps, update_every, start, seed, end_fraction,
                         prune_first_conv, first_update_weights)

    def select(self, k, R, grads, mags):
        if k > mags.numel():
            raise RuntimeError(f"GMP: {k} removals asked among {mags.numel()} active prunable weights")
        return torch.topk(mags, k, largest=False, sorted=False).indices


class AnnealedPruner(GradualPruner):
    """Magnitude first, gradient next, with an annealed rate (as GraNet's gradual pruning):
    the ``max(k, floor(r_t R))`` smallest |w| are candidates, of which the ``k`` smallest |grad| go, with
    ``r_t = rate_end + (rate_start - rate_end) (1 + cos(pi t / end)) / 2`` (at the end: magnitude alone)."""

    method = "annealed"

    def __init__(self, model: nn.Module, target_sparsity: float, total_steps: int, update_every: int = 2000,
                 rate_start: float = 0.5, rate_end: float = 0.0, start: str = "dense", seed: int = 0,
                 end_fraction: float = 0.8, prune_first_conv: bool = False, first_update_weights: str = "forward"):
        for name, v in (("rate_start", rate_start), ("rate_end", rate_end)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
        self.rate_start, self.rate_end = float(rate_start), float(rate_end)
        super().__init__(model, target_sparsity, total_steps, update_every, start, seed, end_fraction,
                         prune_first_conv, first_update_weights)

    def rate_at(self, t: int) -> float:
        return self.rate_end + (self.rate_start - self.rate_end) * (1 + math.cos(math.pi * min(t / self.end_step, 1))) / 2

    def select(self, k, R, grads, mags):
        m = min(max(k, math.floor(self.rate_at(self.steps_taken) * R)), mags.numel())
        if k > m:
            raise RuntimeError(f"annealed: {k} removals asked among {mags.numel()} active prunable weights")
        cand = torch.topk(mags, m, largest=False, sorted=False).indices
        return cand[torch.topk(grads[cand], k, largest=False, sorted=False).indices]

    def _config(self) -> dict:
        return super()._config() | {"rate_start": self.rate_start, "rate_end": self.rate_end}


METHODS = {"fggp": FGGP, "gmp": GMP, "annealed": AnnealedPruner}
PRUNERS = METHODS


# ----------------------------------------------------------------------------- sparse storage

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack(mask: Tensor) -> Tensor:
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(-1, 8) * _BITS).sum(1, dtype=torch.uint8)


def _unpack(bits: Tensor, n: int) -> Tensor:
    return ((bits.view(-1, 1) & _BITS) != 0).flatten()[:n]


def sparse_state_dict(state: dict[str, Tensor]) -> dict:
    """A compressed copy: each floating tensor with at least half zeros as a bitmask (1 bit per entry) plus its
    nonzero values; the rest as they are. At 90% sparsity a float32 weight takes 0.525 bytes per entry."""
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if v.is_floating_point() and v.dim() >= 2 and int((v == 0).sum()) * 2 >= v.numel():
            mask = v != 0
            out[k] = {"shape": list(v.shape), "bitmask": _pack(mask), "values": v[mask].clone()}
        else:
            out[k] = v
    return out


def dense_state_dict(sparse: dict) -> dict[str, Tensor]:
    """The inverse of :func:`sparse_state_dict`; ValueError naming the entry when ``sparse`` is not of that form
    (checked before anything is allocated: a packed entry allocates what its bitmask covers, no more)."""
    if not isinstance(sparse, dict):
        raise ValueError(f"a sparse state_dict must be a dict of names to tensors or packed entries, got "
                         f"{type(sparse).__name__}")
    out = {}
    for k, v in sparse.items():
        if not isinstance(k, str):
            raise ValueError(f"sparse state_dict: key {k!r} is not a string")
        if isinstance(v, Tensor):
            out[k] = v
            continue
        if not isinstance(v, dict) or set(v) != {"shape", "bitmask", "values"}:
            raise ValueError(f"sparse state_dict: entry {k!r} must be a tensor or a dict of shape, bitmask and "
                             "values")
        shape, bits, values = v["shape"], v["bitmask"], v["values"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"sparse state_dict: entry {k!r} has shape {shape!r}, not a list of ints >= 0")
        n = math.prod(shape)
        if not isinstance(bits, Tensor) or bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != -(-n // 8):
            raise ValueError(f"sparse state_dict: entry {k!r} needs a 1-D uint8 bitmask of {-(-n // 8)} bytes for "
                             f"shape {shape}")
        mask = _unpack(bits, n)
        if (not isinstance(values, Tensor) or values.dim() != 1 or not values.is_floating_point()
                or values.numel() != int(mask.sum())):
            raise ValueError(f"sparse state_dict: entry {k!r} needs a 1-D floating tensor of its bitmask's "
                             f"{int(mask.sum())} nonzero values")
        dense = torch.zeros(n, dtype=values.dtype, device=values.device)
        dense[mask.to(values.device)] = values
        out[k] = dense.view(shape)
    return out


def serialized_bytes(obj) -> int:
    """Bytes of ``torch.save(obj)``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def save_sparse(state: dict[str, Tensor], path) -> dict:
    """Save the compressed copy to ``path`` (atomically) and its SHA-256 to ``path.sha256``; returns dense and
    compressed sizes in bytes."""
    from pathlib import Path

    from .._io import save_tensors

    save_tensors(sparse_state_dict(state), path)
    return {"dense_bytes": serialized_bytes(state), "sparse_bytes": Path(path).stat().st_size}


def load_sparse(path, map_location="cpu", verify: bool = True) -> dict[str, Tensor]:
    """A dense state_dict from a file written by :func:`save_sparse`.

    The file's digest (``path.sha256``) is checked on the very bytes that are unpickled (with
    ``weights_only=True``); a changed file raises :class:`~polarprune_cuda._io.IntegrityError` (a
    ValueError naming it). ``verify=False`` skips the digest (a file written elsewhere); the structure is
    checked either way.
    """
    from .._io import load_tensors

    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True or False, got {verify!r}")
    sparse = load_tensors(path, map_location=map_location, verify=verify)
    try:
        return dense_state_dict(sparse)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
