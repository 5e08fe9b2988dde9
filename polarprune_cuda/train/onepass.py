"""The one-pass recipe in your own training loop: :class:`OnePass`.

    pruner = OnePass(model, example, target_sparsity=0.5, total_steps=epochs * len(loader),
                     optimizer=opt, scheduler=sched, cost="macs")
    for x, y in loader:                                    # any loop, any optimizer of torch.optim
        loss = F.cross_entropy(pruner.model(x), y) + pruner.penalty()
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        pruner.step()                                      # schedule, freeze, exact target, switch
    small = pruner.finish()                                # the extracted network, trained

What it does, step by step (the CLI's trainer, :mod:`~polarprune_cuda.train.loop`, is a user of it too):

* construction: gates the model (:func:`~polarprune_cuda.attach_gates`) unless it is gated already; checks the
  optimizer (its kind must be one whose state can follow the channels, :data:`CARRIED`) and the gate scores'
  parameter group (:func:`check_gate_group`: in no group, the group is added with a warning; in a group with
  other parameters, with weight decay, or with a learning rate that cannot move them: refused, with the fix);
* :meth:`penalty`: the polarization penalty of this step (after the forward pass, which computed it fused
  with the gates), ramped in after a warm-up; zero once the gates are frozen;
* :meth:`step` (after ``optimizer.step()``): counts the step; the scores move only between the warm-up and
  the freeze (outside, they get no gradient, so no optimizer moves them); at the freeze the hard gates become
  the set that meets the target exactly (:func:`~polarprune_cuda.meet_target`), with a warning when few gates
  were polarized, and training moves to the extracted network: :attr:`model` changes, and the user's
  optimizer and scheduler objects keep working, every per-parameter state (momentum, ``exp_avg``,
  ``exp_avg_sq``, ...) gathered by the same index maps as the weights, and the schedule starts again over the
  steps left (``restart_schedule``, :func:`restart`);
* :meth:`finish`: the extracted network; the trained weights also go back into the gated model.

:meth:`state_dict` / :meth:`load_state_dict` resume it, also across the switch (load it before the
optimizer's and scheduler's own state).

Gradient accumulation: call :meth:`penalty` with every micro-batch's loss and :meth:`step` once per optimizer
step (``total_steps`` counts optimizer steps). Mixed precision: the forward under ``torch.autocast``, a
``GradScaler`` around the backward and ``optimizer.step()`` as usual. ``torch.compile``: compile
``pruner.model`` and compile again after the switch (:attr:`switched`), which hands a new network.
DistributedDataParallel: build OnePass with the plain model and ``wrap=lambda m: DistributedDataParallel(m,
...)``; :attr:`model` is then the wrapped network, rebuilt around the extracted one at the switch (and when the
gate scores start or stop training, so the wrapper knows which parameters train); every rank does the same
freeze, target and extraction, as its scores and weights are the same.
"""
from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from torch import Tensor, nn

from ..defaults import COST, COSTS, MIN_CHANNELS, PRETRAINED_FREEZE
from ..ops.common import is_number
from ..gates.bank import find_bank
from ..gates.loss import PolarizationLoss, gate_stats
from ..gates.loss import ramp as ramp_schedule
from ..surgery.budget import meet_target
from ..surgery.spec import spec_digest
from . import switch as switch_mod

#: optimizers whose per-parameter state is tensors of the parameter's shape (carried through the index maps) and
#: scalars (the step count, copied): the ones :class:`OnePass` accepts
CARRIED = ("SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "RMSprop", "Adagrad", "ASGD", "Rprop")
#: fraction of the run without the penalty, over which it then ramps in, and after which the gates freeze
WARMUP, RAMP, FREEZE = 1 / 12, 1 / 6, 0.3
#: below this fraction of polarized gates at the freeze, the target is met on scores that barely trained: warned
POLARIZED_WARNING = 0.1
#: an Adam-type gate group's learning rate is ADAM_GATE_C / (steps from the warm-up to the freeze) (gate_lr)
ADAM_GATE_C = 16.0


def _number(name: str, value, lo: float, hi: float, hi_open: bool = True) -> float:
    if not is_number(value) or value < lo or (value >= hi if hi_open else value > hi):
        raise ValueError(f"{name} must be a number in [{lo}, {hi}{')' if hi_open else ']'}, got {value!r}")
    return float(value)


def gate_group(optimizer: torch.optim.Optimizer, scores: Tensor) -> int | None:
    """The index of the parameter group holding ``scores``, or None."""
    for i, group in enumerate(optimizer.param_groups):
        if any(p is scores for p in group["params"]):
            return i
    return None


def _reach(optimizer: torch.optim.Optimizer, lr: float, steps: int, n_gates: int, target_weight: float) -> float:
    """About how far a gate score can move in ``steps`` steps at learning rate ``lr``: an Adam-type step moves it
    by about ``lr`` whatever the gradient's size; an SGD step by ``lr`` times its gradient, of the order of
    ``target_weight / n_gates`` (the penalty is a mean over the gates)."""
    scale = target_weight / max(n_gates, 1) if isinstance(optimizer, torch.optim.SGD) else 1.0
    return lr * steps * scale


def check_gate_group(optimizer: torch.optim.Optimizer, scores: Tensor, steps: int, lr: float,
                     target_weight: float = 20.0) -> int:
    """The index of the gate scores' group, checked; the group is added (lr ``lr``, no weight decay, with a
    warning) when no group holds them. Refused (ValueError, with the fix): the scores in a group with other
    parameters, a group with weight decay, a learning rate that cannot move a score by 1 in ``steps`` steps."""
    fix = ("give the gate scores a group of their own, e.g. weights, scores = polarprune_cuda."
           "split_parameters(model); torch.optim.AdamW([{'params': weights}, {'params': scores, 'lr': "
           "OnePass.gate_lr(optimizer_class, steps, scores[0].numel()), 'weight_decay': 0.0}], ...)")
    i = gate_group(optimizer, scores)
    if i is None:
        optimizer.add_param_group({"params": [scores], "lr": lr, "weight_decay": 0.0})
        warnings.warn(f"the optimizer had no parameter group for the {scores.numel()} gate scores (they would never "
                      f"move): OnePass added one with lr={lr:g} and no weight decay; to choose yourself, {fix}",
                      stacklevel=3)
        return len(optimizer.param_groups) - 1
    group = optimizer.param_groups[i]
    if len(group["params"]) != 1:
        raise ValueError(f"the gate scores share parameter group {i} with {len(group['params']) - 1} other "
                         f"parameters, so their learning rate and weight decay are the weights' (with AdamW the "
                         f"gates barely move and the target is met on untrained scores); {fix}")
    if group.get("weight_decay", 0.0):
        raise ValueError(f"the gate scores' group {i} has weight_decay={group['weight_decay']}: decay pulls every "
                         f"score toward 0 (the gate's edge) whatever the penalty says; set it to 0.0 ({fix})")
    reach = _reach(optimizer, group["lr"], steps, scores.numel(), target_weight)
    if reach < 1.0:
        raise ValueError(f"the gate scores' learning rate {group['lr']:g} cannot move a score by 1 in the {steps} "
                         f"steps the gates train (about {reach:.2g} at most): raise it to at least "
                         f"{group['lr'] / max(reach, 1e-300):.3g}, or train the gates longer (OnePass.gate_lr gives "
                         f"the recipe's rate: {OnePass.gate_lr(type(optimizer), steps, scores.numel(), target_weight):.3g})")
    return i


class OnePass:
    """The one-pass pruning recipe added to any PyTorch training loop.

    Args:
        model: the network (gated here with :func:`~polarprune_cuda.attach_gates` unless it has a gate bank).
        example_inputs: one batch on the model's device (its shapes set the MACs and extraction checks).
        target_sparsity: fraction of ``cost`` to remove, in [0, 1).
        total_steps: the run's length in optimizer steps (:meth:`step` calls).
        optimizer: the user's optimizer (one of :data:`CARRIED`); see :func:`check_gate_group` for its groups.
        scheduler: the user's learning-rate scheduler, if any (kept working across the switch).
        cost: ``"macs"``, ``"params"``, ``"channels"`` or ``"latency"`` (measured here, unless the model's bank has
            it: :func:`~polarprune_cuda.latency_cost` on ``latency_inputs``).
        freeze_at, warmup, ramp: fractions of ``total_steps``: where the gates freeze (default 0.3), how long
            without the penalty (1/12), how long it ramps in (1/6).
        pretrained: the model's weights are trained: rank the gate scores by them
            (:func:`~polarprune_cuda.scores_from_magnitude`) and, unless ``freeze_at`` or ``warmup`` is given, freeze
            the gates at once (1% of the run, no warm-up) on that ranking, what ``polarprune prune --init`` does
            (measured: docs/results.md, from a pretrained model).
        gate_lr: the learning rate of a gate group that OnePass adds (default :meth:`gate_lr`).
        switch: train the extracted network after the freeze (False: the gated one to the end).
        target_weight, polarization_weight, polarization: the penalty (:class:`PolarizationLoss`).
        min_channels, round_to, ste, init: :func:`~polarprune_cuda.attach_gates`'s, where OnePass gates.
        wrap: a callable ``network -> module to call`` (DistributedDataParallel), applied to the network being
            trained whenever it changes.
        warmup_steps, ramp_steps: the warm-up and the ramp in steps (instead of ``warmup``, ``ramp``).
        check_group: check the gate scores' parameter group (:func:`check_gate_group`); the CLI, which builds
            its own, passes False.
        restart_schedule: at the freeze the learning-rate schedule starts again from its beginning, run over
            the steps that are left (the extracted network trains as a new run of the same schedule); for a
            ``LambdaLR`` (its lambdas rescaled in time) or a ``CosineAnnealingLR`` (its ``T_max`` set to the steps
            left). Measured with AdamW (benchmarks/results/user-loop-adamw-levers-fashion-12k.md): it closes most of
            the gap to dense training. Another scheduler with it is refused at construction (pass False).
        latency_inputs: with ``cost="latency"``, the batch the latency is for (its size, device and dtype;
            default ``example_inputs``).
        latency_cache: the latency tables' file (default: :func:`polarprune_cuda.surgery.latency.default_cache`).
        latency_progress: a progress bar while the latency tables are measured (default True).
        ranked_freeze: the gates freeze on a ranking given to them, so scores that barely trained at the freeze
            are what was asked for: no warning, no check of the gate group (default: ``pretrained`` with neither
            ``freeze_at`` nor ``warmup`` given).
        hold_scores: outside the gate window the scores get no gradient, so no optimizer moves them (False:
            the caller's schedule holds them, as the CLI's gives their group a learning rate of 0 there, its SGD
            momentum gathering the task's gradient during the warm-up).

    Attributes: :attr:`model` (call it: the network being trained, wrapped), :attr:`network` (the same,
    unwrapped), :attr:`gated` (the gated model; after the switch its gates are frozen and its weights catch up
    at :meth:`finish`), :attr:`budget` (what :func:`~polarprune_cuda.meet_target` chose), :attr:`steps`.
    """

    def __init__(self, model: nn.Module, example_inputs, target_sparsity: float, total_steps: int,
                 optimizer: torch.optim.Optimizer, scheduler=None, *, cost: str = COST, freeze_at: float | None = None,
                 warmup: float | None = None, ramp: float = RAMP, gate_lr: float | None = None, switch: bool = True,
                 target_weight: float = 20.0, polarization_weight: float = 0.1, polarization: str = "bimodal",
                 min_channels: int = MIN_CHANNELS, round_to: int | None = None, ste: str = "identity",
                 init: float = 1.0, wrap=None, warmup_steps: int | None = None, ramp_steps: int | None = None,
                 check_group: bool = True, hold_scores: bool = True, restart_schedule: bool = True,
                 pretrained: bool = False, ranked_freeze: bool | None = None, latency_inputs=None,
                 latency_cache=None, latency_progress: bool = True):
        from ..surgery.attach import attach_gates, scores_from_magnitude
        from ..surgery.latency import latency_cost

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1 (the optimizer steps of the run), got {total_steps!r}")
        if wrap is not None and not callable(wrap):
            raise TypeError(f"wrap must be a callable network -> module to train (e.g. DistributedDataParallel), "
                            f"got {type(wrap).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if type(optimizer).__name__ not in CARRIED:
            raise ValueError(f"optimizer {type(optimizer).__name__}: its state cannot be carried to the extracted "
                             f"network (OnePass carries the per-parameter state of {', '.join(CARRIED)}, whose "
                             f"state tensors have their parameter's shape); use one of those")
        if not isinstance(restart_schedule, bool):
            raise TypeError(f"restart_schedule must be True or False, got {restart_schedule!r}")
        if restart_schedule and scheduler is not None and type(scheduler) not in RESTARTED:
            raise ValueError(f"restart_schedule: OnePass restarts a {' or a '.join(c.__name__ for c in RESTARTED)} "
                             f"at the freeze, not a {type(scheduler).__name__}; pass restart_schedule=False to keep "
                             "its schedule running through the freeze")
        self.restart_schedule = restart_schedule
        if not isinstance(pretrained, bool):
            raise TypeError(f"pretrained must be True or False, got {pretrained!r}")
        if ranked_freeze is not None and not isinstance(ranked_freeze, bool):
            raise TypeError(f"ranked_freeze must be True, False or None, got {ranked_freeze!r}")
        #: the gates freeze at once on a given ranking: a window too short to train them is what was asked
        self.ranked_freeze = (pretrained and freeze_at is None and warmup is None) if ranked_freeze is None \
            else ranked_freeze
        if freeze_at is None:
            freeze_at = PRETRAINED_FREEZE if self.ranked_freeze else FREEZE
        if warmup is None:
            warmup = 0.0 if self.ranked_freeze else WARMUP
        self.freeze_at = _number("freeze_at", freeze_at, 0.0, 1.0, hi_open=False)
        warmup, ramp_ = _number("warmup", warmup, 0.0, 1.0), _number("ramp", ramp, 0.0, 1.0)
        if cost not in COSTS:
            raise ValueError(f"cost must be one of {', '.join(COSTS)}, got {cost!r}")
        if find_bank(model) is None:
            attach_gates(model, example_inputs, min_channels=min_channels, round_to=round_to, ste=ste, init=init)
        self.bank = find_bank(model)
        #: what latency_cost measured (cost "latency" only)
        self.latency = None
        if cost == "latency" and "latency" not in self.bank.cost_kinds:
            self.latency = latency_cost(model, example_inputs if latency_inputs is None else latency_inputs,
                                        cache=latency_cache, progress=latency_progress)
        if pretrained:
            scores_from_magnitude(model)
        self.gated = model
        self.wrap = wrap
        self.network = model
        self.model = model
        self.example = example_inputs
        self.optimizer, self.scheduler = optimizer, scheduler
        self.total_steps, self.cost, self.switch_enabled = total_steps, cost, switch
        self.freeze_step = int(self.freeze_at * total_steps)
        self.warmup_steps = int(round(warmup * total_steps)) if warmup_steps is None else \
            self._steps("warmup_steps", warmup_steps)
        ramp_steps = int(round(ramp_ * total_steps)) if ramp_steps is None else self._steps("ramp_steps", ramp_steps)
        window = max(self.freeze_step - self.warmup_steps, 0)
        n = self.bank.scores.numel()
        lr = self.gate_lr(optimizer, window, n, target_weight) if gate_lr is None else gate_lr
        if window > 0 and check_group and not self.ranked_freeze:   # the gates train: their group must let them
            check_gate_group(optimizer, self.bank.scores, window, lr, target_weight)
        self.loss = PolarizationLoss(target_sparsity, cost=cost, polarization=polarization,
                                     target_weight=target_weight, polarization_weight=polarization_weight,
                                     schedule=ramp_schedule(self.warmup_steps, ramp_steps))
        self.loss.arm(model)
        self.target_sparsity = float(target_sparsity)
        self.hold_scores = hold_scores
        self.steps = 0
        self.budget: dict | None = None
        self.polarized_at_freeze: float | None = None
        #: what the freeze warning advises when few gates are polarized (the CLI names its options)
        self.advice = "train longer, freeze later (freeze_at) or raise the gate learning rate"
        self.maps: dict[str, Tensor] | None = None
        self._gates_move(self._moving(0))
        self._set_network(model)
        if self.freeze_step == 0:   # no gate training: the target is met on the scores as they are
            self._freeze()

    @staticmethod
    def _steps(name: str, value) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        return value

    def _set_network(self, network: nn.Module) -> None:
        """Train ``network`` from now on: :attr:`network` is it, :attr:`model` it wrapped (``wrap``)."""
        self.network = network
        self.model = self.wrap(network) if self.wrap is not None else network

    # ------------------------------------------------------------------ the recipe's rules

    @staticmethod
    def gate_lr(optimizer_class, window_steps: int, n_gates: int, target_weight: float = 20.0) -> float:
        """The gate scores' learning rate for ``window_steps`` steps of gate training (warm-up to freeze) and
        ``n_gates`` gates. SGD: the CLI's rule, ``0.1 * n_gates / target_weight`` (optim.make_optimizer).
        Adam-type: ``16 / window_steps``, measured (benchmarks/results/gate-lr-adamw-digits.md: ResNet-20 on
        digits, AdamW, c / window for c from 0.5 to 256): c <= 4 leaves every gate unpolarized at the freeze, 16
        polarizes about a quarter with the best accuracies, 64 and more polarize over half but cost 1-2 points."""
        cls = optimizer_class if isinstance(optimizer_class, type) else type(optimizer_class)
        if issubclass(cls, torch.optim.SGD):
            return 0.1 * n_gates / max(target_weight, 1e-12)
        return ADAM_GATE_C / max(window_steps, 1)

    def _moving(self, step: int) -> bool:
        return self.warmup_steps <= step < self.freeze_step

    def _gates_move(self, moving: bool) -> None:
        """The scores get gradients (and so steps) only while they move: outside the window no optimizer, whatever
        its momentum or decay, changes them."""
        scores = self.bank.scores
        if not self.hold_scores:
            return
        scores.requires_grad_(moving)
        if not moving:
            scores.grad = None

    @property
    def frozen(self) -> bool:
        return self.steps >= self.freeze_step

    @property
    def switched(self) -> bool:
        return self.network is not self.gated

    # ------------------------------------------------------------------ the loop's calls

    def penalty(self) -> Tensor:
        """The penalty term of this step, to add to the task loss after the forward pass; 0 once frozen."""
        if self.frozen:
            return torch.zeros((), device=self.bank.scores.device)
        return self.loss(self.gated, step=self.steps)

    def step(self) -> None:
        """After ``optimizer.step()`` (and the scheduler's): count the step; at the freeze meet the target and
        switch to the extracted network."""
        self.steps += 1
        moved, moving = self.bank.scores.requires_grad, self._moving(self.steps)
        self._gates_move(moving)
        if self.steps == self.freeze_step and self.budget is None:
            self._freeze()
        elif moved != moving and self.wrap is not None:   # the wrapper (DDP) learns which parameters train
            self._set_network(self.network)

    def _freeze(self) -> None:
        stats = gate_stats(self.gated, cost=self.cost)
        if stats["polarized"] < POLARIZED_WARNING and not self.ranked_freeze:
            warnings.warn(f"the gates freeze at step {self.steps} with {stats['polarized']:.1%} of them polarized: "
                          f"the target is met on scores that barely trained (the penalty acted for "
                          f"{max(self.steps - self.warmup_steps, 0)} steps); {self.advice}", stacklevel=3)
        self.budget = meet_target(self.gated, self.target_sparsity, self.cost).to_dict()
        self.polarized_at_freeze = stats["polarized"]
        if self.switch_enabled:
            self._switch()
        elif self.wrap is not None:
            self._set_network(self.network)
        self._restart()

    def _restart(self) -> None:
        if self.restart_schedule and self.scheduler is not None:
            restart(self.scheduler, self.freeze_step, self.total_steps)

    def _switch(self, carry: bool = True) -> None:
        small, maps = switch_mod.extracted(self.gated, self.example)
        small.train(self.gated.training)
        carry_state(self.optimizer, self.gated, small, maps, carry=carry)
        self.maps = maps
        self._set_network(small)

    def _adopt(self, gated: nn.Module, network: nn.Module, optimizer, scheduler, maps=None) -> None:
        """Continue with networks and an optimizer built elsewhere (the CLI's resume and shrinks): ``gated`` the
        gated model, ``network`` the one being trained (``gated`` itself before the switch)."""
        self.gated, self.bank, self.maps = gated, find_bank(gated), maps
        self.optimizer, self.scheduler = optimizer, scheduler
        self._set_network(network)

    def finish(self) -> nn.Module:
        """The extracted network with the trained weights (also written back into the gated model)."""
        if self.budget is None:   # the gates trained to the end: meet the target now
            self.budget = meet_target(self.gated, self.target_sparsity, self.cost).to_dict()
        if not self.switched:
            small, _ = switch_mod.extracted(self.gated, self.example)
            return small
        switch_mod.write_back(self.network, self.gated, self.maps)
        return self.network

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        """The recipe's position and the networks' weights (the optimizer and scheduler save their own)."""
        out = {"steps": self.steps, "loss_step": self.loss.step, "budget": self.budget,
               "polarized_at_freeze": self.polarized_at_freeze,
               "switched": self.switched, "gated": self.gated.state_dict()}
        if self.switched:
            out["model"] = self.network.state_dict()
            out["spec_digest"] = spec_digest(self.network.polarprune_spec)
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` into a OnePass built like the saved one; then load the optimizer's and
        the scheduler's state (their parameters are this object's by then)."""
        if not isinstance(state, dict) or not {"steps", "gated", "switched"} <= set(state):
            raise ValueError("state must be a OnePass.state_dict()")
        if self.switched:
            raise RuntimeError("load_state_dict needs a OnePass that has not switched yet (a freshly built one)")
        self.gated.load_state_dict(state["gated"])
        self.steps, self.loss.step, self.budget = int(state["steps"]), int(state["loss_step"]), state["budget"]
        self.polarized_at_freeze = state.get("polarized_at_freeze")
        self._gates_move(self._moving(self.steps))
        if state["switched"]:
            self._switch(carry=False)
            if spec_digest(self.network.polarprune_spec) != state["spec_digest"]:
                raise ValueError("the saved extracted network is not the extraction of the saved gated model")
            self.network.load_state_dict(state["model"])
        elif self.wrap is not None:
            self._set_network(self.network)
        if self.budget is not None:   # frozen: the schedule restarted then (its own state_dict follows)
            self._restart()


RESTARTED = (torch.optim.lr_scheduler.LambdaLR, torch.optim.lr_scheduler.CosineAnnealingLR)


def restart(scheduler, start: int, total: int) -> None:
    """Start ``scheduler``'s schedule again at step ``start``, compressed into the ``total - start`` steps left:
    a ``LambdaLR``'s lambdas read step ``s`` as ``(s - start) * total / (total - start)`` (its step count runs on,
    so a resumed run restores it by calling this again); a ``CosineAnnealingLR`` counts from 0 with ``T_max``
    the steps left (both in its state_dict). The groups' learning rates are set for the next step at once."""
    left = total - start
    if left <= 0:
        return
    if type(scheduler) is torch.optim.lr_scheduler.LambdaLR:
        def rescaled(fn):
            return lambda s: fn(max(s - start, 0) * total / left)

        scheduler.lr_lambdas = [rescaled(fn) for fn in scheduler.lr_lambdas]
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    else:   # CosineAnnealingLR (the constructor refused anything else)
        scheduler.T_max, scheduler.last_epoch = left, 0
        lrs = list(scheduler.base_lrs)
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def carry_state(optimizer: torch.optim.Optimizer, old: nn.Module, new: nn.Module, maps: dict[str, Tensor],
                carry: bool = True) -> None:
    """Point ``optimizer``'s groups at ``new``'s parameters (matched by name; a parameter ``new`` lacks, the gate
    scores, leaves its group) and carry its per-parameter state (:func:`~polarprune_cuda.train.switch.
    carried_state`: tensors of the parameter's shape gathered by ``maps``, anything else, such as step counts,
    copied). The optimizer object stays the same, so a scheduler built on it keeps working."""
    names = {id(p): n for n, p in old.named_parameters()}
    new_params = dict(new.named_parameters())
    state = defaultdict(dict)
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            name = names.get(id(p))
            q = new_params.get(name) if name is not None else None
            if q is None:
                continue
            params.append(q)
            if carry and p in optimizer.state:
                state[q] = switch_mod.carried_state(optimizer.state[p], p, q, maps.get(name))
        group["params"] = params
    optimizer.state = state
