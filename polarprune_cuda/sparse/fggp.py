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

import math

import torch
from torch import nn

from ..ops.common import is_number
from .gradual import (FIRST_UPDATE_WEIGHTS, STARTS, STATE_FORMAT, GradualPruner,  # noqa: F401
                      check_fraction, cubic_density, erk_densities)


class FGGP(GradualPruner):
    """Fixed-rate gradient-first gradual pruning: the ``floor(select_ratio * R)`` smallest |grad| are candidates,
    of which the ``k`` smallest |w| are pruned (see the module docstring)."""

    method = "fggp"

    def __init__(self, model: nn.Module, target_sparsity: float, total_steps: int, update_every: int = 2000,
                 select_ratio: float = 0.5, start: str = "dense", seed: int = 0, end_fraction: float = 0.8,
                 prune_first_conv: bool = False, first_update_weights: str = "forward"):
        self.select_ratio = check_fraction(select_ratio, "select_ratio")
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
            if not is_number(v) or not 0 <= v <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
        self.rate_start, self.rate_end = float(rate_start), float(rate_end)
        super().__init__(model, target_sparsity, total_steps, update_every, start, seed, end_fraction,
                         prune_first_conv, first_update_weights)

    def rate_at(self, t: int) -> float:
        cosine = 1 + math.cos(math.pi * min(t / self.end_step, 1))
        return self.rate_end + (self.rate_start - self.rate_end) * cosine / 2

    def select(self, k, R, grads, mags):
        m = min(max(k, math.floor(self.rate_at(self.steps_taken) * R)), mags.numel())
        if k > m:
            raise RuntimeError(f"annealed: {k} removals asked among {mags.numel()} active prunable weights")
        cand = torch.topk(mags, m, largest=False, sorted=False).indices
        return cand[torch.topk(grads[cand], k, largest=False, sorted=False).indices]

    def _config(self) -> dict:
        return super()._config() | {"rate_start": self.rate_start, "rate_end": self.rate_end}


#: the pruner class of each unstructured method (train.config.METHODS names the methods of a run)
PRUNERS = {"fggp": FGGP, "gmp": GMP, "annealed": AnnealedPruner}


# the compressed storage lives in storage.py; these names stay importable from here
from .storage import (dense_state_dict, load_sparse, save_sparse, serialized_bytes,  # noqa: E402,F401
                      sparse_state_dict)
