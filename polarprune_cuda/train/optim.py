"""The optimizer and the schedules of a pruning run: SGD with a parameter group for the gate scores, the
learning-rate lambdas (cosine for the weights, a window for the gates) and the penalty's ramp."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..gates.loss import ramp
from ..gates.bank import find_bank


def split_parameters(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the weights, [the gate scores]) of a gated model: the two parameter groups an optimizer needs (the
    scores' list is empty without a gate bank)."""
    bank = find_bank(model)
    scores = [bank.scores] if bank is not None else []
    ids = {id(p) for p in scores}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in ids], scores


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                   gate_lr: float = 0.1, target_weight: float = 20.0) -> torch.optim.SGD:
    """SGD with two groups: the weights (weight decay, Nesterov) and the gate scores.

    The penalty is a mean over all gates, so the scores' step is scaled by
    their number: ``gate_lr * n_gates / target_weight``; no weight decay on them.
    Block gates take the step they would take in a bank of block gates alone
    (``gate_lr * n_blocks / target_weight``): their gradient is scaled by
    ``n_blocks / n_gates`` (a hook on the scores, installed once). Otherwise a
    block gate, whose task-loss gradient sums over a whole branch, would move
    by as many times more as there are channel gates.
    """
    bank = find_bank(model)
    if bank is not None:
        _scale_block_gradients(bank)
    weights, scores = split_parameters(model)
    groups = [{"params": weights, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
               "nesterov": momentum > 0}]
    if scores:
        groups.append({"params": scores, "lr": gate_lr * bank.scores.numel() / max(target_weight, 1e-12),
                       "momentum": 0.9, "weight_decay": 0.0})
    return torch.optim.SGD(groups)


def _scale_block_gradients(bank) -> None:
    blocks = bank.block_segments
    if not blocks or len(blocks) == bank.scores.numel():
        bank.scale_score_gradients(None)
        return
    scale = torch.ones_like(bank.scores.detach())
    offsets = bank.offsets
    for b in blocks:
        scale[offsets[b]] = len(blocks) / bank.scores.numel()
    bank.scale_score_gradients(scale)


def lr_lambdas(total_steps: int, freeze_step: int | None, warmup_steps: int = 0,
               freeze_lr_scale: float = 1.0) -> list[Callable[[int], float]]:
    """Cosine decay for the weights (times ``freeze_lr_scale`` from ``freeze_step`` on); the gate scores move
    only between warm-up and ``freeze_step``."""
    def cosine(step):
        scale = freeze_lr_scale if freeze_step is not None and step >= freeze_step else 1.0
        return scale * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))

    def gates(step):
        return 1.0 if warmup_steps <= step and (freeze_step is None or step < freeze_step) else 0.0

    return [cosine, gates]


def penalty_schedule(steps_per_epoch: int, warmup_epochs: float, ramp_epochs: float):
    """The penalty weight: 0 during warm-up, then a linear ramp to 1 (see :func:`ramp`)."""
    return ramp(int(round(warmup_epochs * steps_per_epoch)), int(round(ramp_epochs * steps_per_epoch)))
