"""Shrinking a gated model while its gates still train: the channels of chosen (closed) gates removed physically,
every other gate kept.

:func:`remove_gates` returns a copy of the gated model without the channels of the given gates, and the index
maps of its tensors (as :func:`~polarprune_cuda.surgery.extract.index_maps` gives them for an extraction), so
per-element training state can follow. The bank keeps every gate: its cost models, the penalty and the exact
budget still count in the dense model's units. A removed gate is pinned closed (its score set to
``-PINNED_SCORE``, its gradient masked) and :func:`~polarprune_cuda.surgery.budget.meet_target` never opens it.
Each group records the original channels still present (``GroupRecord.present``); extraction translates its
kept channels to them, and the spec it writes stays in the dense model's numbering.

Not for models with block gates (a block gate multiplies a segment, which the per-channel index of a shrunk
module does not carry) nor with ``round_to`` (rounding a width up may need a channel already removed).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..gates.bank import install_bank, remove_bank
from ..gates.modules import GateMixin
from .attach import SurgeryRecord, surgery_of
from .inputs import model_device, random_inputs, index_maps_of, index_probe
from .tp import remove_channels

#: the score a removed gate is pinned at: sigmoid(-20) ~ 2e-9, so the soft density the penalty sees counts it 0
PINNED_SCORE = 20.0


def check_shrinkable(model: nn.Module) -> None:
    """ValueError naming why the gated ``model`` cannot shrink while training (block gates, round_to)."""
    _, record = surgery_of(model)
    if record.blocks:
        raise ValueError("shrink-every does not apply to models with block gates (--blocks)")
    if record.round_to:
        raise ValueError(f"shrink-every does not apply with round_to={record.round_to} (rounding a width up may "
                         "need a channel that was removed)")


def removed_gates(model: nn.Module) -> Tensor:
    """Per bank gate (flat), True where its channels were removed (:func:`remove_gates`)."""
    return removed_in(*surgery_of(model))


def removed_in(bank, record: SurgeryRecord) -> Tensor:
    out = torch.zeros(bank.scores.numel(), dtype=torch.bool)
    for rec, offset in zip(record.groups, bank.offsets):
        if rec.present is not None:
            present = torch.zeros(rec.size, dtype=torch.bool)
            present[torch.tensor(rec.present, dtype=torch.long) % rec.size] = True
            out[offset:offset + rec.size] = ~present
    return out


def _current(rec) -> list[int]:
    """The group's original channels present now, in the order the layers hold them."""
    return list(range(rec.channels)) if rec.present is None else list(rec.present)


def _plan(bank, record: SurgeryRecord, gates: Tensor) -> list[dict]:
    """Per group, what :func:`~polarprune_cuda.surgery.tp.remove_channels` takes, in the current numbering:
    ``channels`` present now, ``kept`` the positions that stay; ``present`` the original channels after."""
    plan = []
    for rec, offset in zip(record.groups, bank.offsets):
        now = _current(rec)
        drop = gates[offset:offset + rec.size]
        kept = [i for i, ch in enumerate(now) if not bool(drop[ch % rec.size])]
        plan.append({"name": rec.name, "root": rec.root, "channels": len(now), "kept": kept,
                     "present": [now[i] for i in kept]})
    return plan


def _flat_index(module: GateMixin, bank) -> Tensor:
    """Per current channel of a gate module, the flat bank gate it reads (-1: none)."""
    if module.gate_index is not None:
        return module.gate_index.detach().cpu().clone()
    size = bank.sizes[module.gate_segment]
    channels = size * module.gate_repeat
    return bank.offsets[module.gate_segment] + torch.arange(channels) % size


def _remove(model: nn.Module, plan: list[dict], dtype: torch.dtype | None = None) -> None:
    """Remove the planned channels from the gated ``model`` in place: Torch-Pruning works on it with its gate
    modules of their plain classes and without the bank; both come back after."""
    bank, record = surgery_of(model)
    gated = [m for m in model.modules() if isinstance(m, GateMixin)]
    classes = [type(m) for m in gated]
    inputs = random_inputs(record.input_shapes, record.input_dtypes, model_device(model))
    if dtype is not None:
        inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    remove_bank(model)
    try:
        for m in gated:
            m.__class__ = m.plain_class
        remove_channels(model, [g for g in plan if len(g["kept"]) < g["channels"]], inputs)
    finally:
        for m, cls in zip(gated, classes):
            m.__class__ = cls
        install_bank(model, bank)
    for rec, g in zip(record.groups, plan):
        rec.present = g["present"] if len(g["present"]) < rec.channels else None


def remove_gates(model: nn.Module, gates: Tensor) -> tuple[nn.Module, dict[str, Tensor]]:
    """A copy of the gated ``model`` without the channels of ``gates`` (a bool per bank gate), those gates pinned
    closed; and, per floating parameter and buffer of the copy (gate scores aside: the bank keeps every gate),
    the flat indices into ``model``'s tensor of the same name that its elements come from.

    The maps come from the same removal on a float64 copy whose every element holds its own flat index (plus
    one), as :func:`~polarprune_cuda.surgery.extract.index_maps` finds an extraction's.
    """
    bank, record = surgery_of(model)
    check_shrinkable(model)
    gates = gates.detach().to(torch.bool).cpu()
    if gates.shape != bank.scores.shape:
        raise ValueError(f"gates must have one entry per bank gate ({bank.scores.numel()}), got {tuple(gates.shape)}")
    plan = _plan(bank, record, gates)
    probe, skip = index_probe(model)
    _remove(probe, plan, dtype=torch.float64)
    maps = index_maps_of(probe, "channel removal", {n for n, p in probe.named_parameters() if id(p) in skip})
    old_shapes = {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, GateMixin)}
    rows = {name: _rows(maps[f"{name}.weight"], old_shapes[name]) for name, m in probe.named_modules()
            if isinstance(m, GateMixin)}
    small = copy.deepcopy(model)
    old_index = {name: _flat_index(m, bank) for name, m in model.named_modules() if isinstance(m, GateMixin)}
    _remove(small, plan)
    new_bank, _ = surgery_of(small)
    for name, m in small.named_modules():
        if isinstance(m, GateMixin):
            m.register_buffer("_pp_gate_index", old_index[name][rows[name]].to(new_bank.scores.device),
                              persistent=False)
    pin(small)
    return small, maps


def _rows(weight_map: Tensor, old_shape: tuple) -> Tensor:
    """The original output channels (rows) a module's shrunk weight holds, from its index map and the shape
    the weight had."""
    per_row = 1
    for size in old_shape[1:]:
        per_row *= size
    return (weight_map.reshape(weight_map.shape[0], -1)[:, 0] // per_row).cpu()


def pin(model: nn.Module) -> Tensor:
    """Pin the removed gates of ``model`` closed: scores at most ``-PINNED_SCORE``, gradients zero; returns the
    removed gates' mask."""
    bank, _ = surgery_of(model)
    removed = removed_gates(model).to(bank.scores.device)
    with torch.no_grad():
        bank.scores[removed] = torch.minimum(bank.scores[removed],
                                             torch.full_like(bank.scores[removed], -PINNED_SCORE))
    bank.scale_score_gradients((~removed).to(bank.scores.dtype) if bool(removed.any()) else None)
    return removed


__all__ = ["PINNED_SCORE", "check_shrinkable", "pin", "remove_gates", "removed_gates"]
