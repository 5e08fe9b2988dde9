"""attach_gates: gate every prunable channel group (and, optionally, every residual block) of a model.

The coupled channel groups come from Torch-Pruning (:mod:`.tp`); each gets one
segment of the model's :class:`~polarprune_cuda.GateBank` and gates its
BatchNorms (``gamma * g``, ``beta * g``) or, where no BatchNorm follows a
producer, its output-channel weights. The exact cost models (:mod:`.costs`) are
registered on the bank, and what was done is kept on it as a
:class:`SurgeryRecord` (``bank.surgery``) for extract and meet_target.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..defaults import MIN_CHANNELS
from ..errors import UnsupportedModelError
from ..gates.bank import GateBank, find_bank, install_bank
from ..gates.modules import GateMixin, gate_in_place, gate_modules
from ..ops.common import is_number
from .blocks import BlockRecord, depth, prepare_blocks
from .costs import block_exactness, channel_cost_model, cost_models, io_shapes, count
from .inputs import as_inputs, check_model_arg, check_placement, dtype_name, model_device
from .tp import ON_UNSUPPORTED, Refusal, Plan, channel_plans


@dataclass
class GroupRecord:
    """One coupled channel group and its gate segment."""

    name: str                 # segment name (the root module's name)
    root: str                 # module whose output channels are the group (Torch-Pruning root)
    channels: int             # channels of the group
    repeat: int = 1           # the segment's gates tile this many times (grouped convolutions)
    gated: list[str] = field(default_factory=list)   # modules gated in place
    producers: list[str] = field(default_factory=list)   # layers whose output channels are the group
    # every layer the group's channels pass: ("out" | "in", module name, its channel indices, the group's indices
    # of them); "out" for BatchNorms and producers, "in" for the consumers' input channels
    members: list[tuple[str, str, list[int], list[int]]] = field(default_factory=list)
    # the original channels the layers still hold, in their order, after shrink.remove_gates (None: all)
    present: list[int] | None = None

    @property
    def size(self) -> int:
        return self.channels // self.repeat


@dataclass
class SurgeryRecord:
    """What attach_gates did, kept on the bank (``bank.surgery``) for extract()."""

    groups: list[GroupRecord]
    input_shapes: list[list[int]]
    input_dtypes: list[str]
    min_channels: int
    round_to: int | None
    dense: dict[str, int]
    blocks: list[BlockRecord] = field(default_factory=list)
    dense_depth: int | None = None


def check_guard_args(min_channels, round_to, none_means: str | None = None) -> None:
    """Validate ``min_channels`` and ``round_to`` (the one place for attach_gates, extract, kept_channels and
    predicted_count). With ``none_means``, None is allowed for both and means that."""
    if not (none_means is not None and min_channels is None):
        if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
            alt = f"None ({none_means}) or " if none_means else ""
            raise ValueError(f"min_channels must be {alt}an int >= 1, got {min_channels!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        alt = f" ({none_means})" if none_means else ""
        raise ValueError(f"round_to must be None{alt} or an int >= 1, got {round_to!r}")


def surgery_of(model) -> tuple[GateBank, SurgeryRecord]:
    """The bank of ``model`` and its record; ValueError unless attach_gates gated it."""
    check_model_arg(model)
    bank = find_bank(model)
    record = bank.surgery if bank is not None else None
    if record is None:
        raise ValueError("model has no gates from attach_gates (call pp.attach_gates(model, example_inputs) first)")
    return bank, record


def _check_options(model, init, channels, blocks, ignored_layers):
    """Validate attach_gates' options (before any change to the model); returns ``blocks`` (True, False or a
    list of names)."""
    if not is_number(init):
        raise ValueError(f"init must be a finite number, got {init!r}")
    if not isinstance(channels, bool):
        raise TypeError(f"channels must be True or False, got {channels!r}")
    if blocks is not True and blocks is not False:
        if isinstance(blocks, str) or not isinstance(blocks, Iterable):
            raise TypeError(f"blocks must be True, False or a list of block module names, got {blocks!r}")
        blocks = list(blocks)
        if not blocks:
            raise ValueError("blocks is an empty list: name at least one block, or pass blocks=True for all")
    if not channels and blocks is False:
        raise ValueError("channels=False needs blocks=True (or a list of blocks): there would be nothing to gate")
    if find_bank(model) is not None or gate_modules(model):
        raise ValueError("model already has gates; attach_gates is called once on a plain model")
    if ignored_layers is not None and (
            isinstance(ignored_layers, (str, bytes)) or not isinstance(ignored_layers, Iterable)
            or (isinstance(ignored_layers, nn.Module) and not isinstance(ignored_layers, nn.ModuleList))):
        raise TypeError("ignored_layers must be a list of modules or module names, got "
                        f"{type(ignored_layers).__name__} (e.g. ignored_layers=['layer3.0.conv1'])")
    return blocks


def _ignored_modules(model: nn.Module, names: dict[nn.Module, str], ignored_layers) -> list[nn.Module]:
    """``ignored_layers`` (modules or module names) as modules of ``model``; ValueError naming a stranger."""
    ignored = []
    for item in ignored_layers or ():
        if isinstance(item, str):
            try:
                item = model.get_submodule(item)
            except AttributeError as exc:
                raise ValueError(f"ignored_layers names {item!r}, which is not a module of the model") from exc
        if not isinstance(item, nn.Module) or item not in names:
            raise ValueError(f"ignored_layers must hold modules of the model or their names, got {item!r}")
        ignored.append(item)
    return ignored


def _gate_groups(bank: GateBank, plans: list[Plan], names, init: float) -> list[GroupRecord]:
    """One bank segment per channel group; its BatchNorms and weight-gated producers gated in place. A
    BatchNorm whose channels come from several groups (after a concatenation) reads each channel's gate
    from its group's segment (channels of no gated group keep gate 1)."""
    records = []
    pieces: dict[nn.Module, list[tuple[int, list[int], list[int], int]]] = {}
    for plan in plans:
        size = plan.channels // plan.repeat
        index = bank.add_segment(plan.root, torch.full((size,), float(init)))
        rec = GroupRecord(plan.root, plan.root, plan.channels, plan.repeat,
                          producers=[names[m] for m in plan.producers],
                          members=[(role, names[m], list(idxs), list(root_idxs))
                                   for role, side in (("out", plan.outputs), ("in", plan.inputs))
                                   for m, idxs, root_idxs in side])
        for module in plan.bns + plan.weight_gated:
            gate_in_place(module, bank, index, plan.repeat)
            rec.gated.append(names[module])
        for module, idxs, root_idxs in plan.mixed:
            pieces.setdefault(module, []).append((index, idxs, root_idxs, size))
            rec.gated.append(names[module])
        records.append(rec)
    offsets = bank.offsets
    for module, parts in pieces.items():
        flat = torch.full((module.weight.shape[0],), -1, dtype=torch.long)   # output channels (features)
        for segment, idxs, root_idxs, size in parts:
            flat[torch.tensor(idxs)] = offsets[segment] + torch.tensor(root_idxs) % size
        gate_in_place(module, bank, -1, index=flat)
    return records


def _refuse_or_skip(refused: list[Refusal], on_unsupported: str) -> None:
    """All the groups that cannot be gated, at once: an error naming each, or (skip) one warning."""
    if not refused:
        return
    listing = "\n".join(f"  - {r}" for r in refused)
    if on_unsupported == "skip":
        warnings.warn(f"attach_gates leaves {len(refused)} channel group(s) ungated:\n{listing}", stacklevel=3)
        return
    roots = ", ".join(repr(r.root) for r in refused[:3]) + (", ..." if len(refused) > 3 else "")
    raise UnsupportedModelError(
        f"{len(refused)} channel group(s) of the model cannot be gated:\n{listing}\n"
        f"Pass on_unsupported='skip' to leave them ungated (one warning), or ignored_layers=[{roots}]")


def _gate_blocks(model: nn.Module, bank: GateBank, block_records: list[BlockRecord], init: float) -> None:
    """One single-gate segment per block, carried by the branch's last BatchNorm."""
    block_of: dict[int, int] = {}
    for brec in block_records:
        brec.segment = bank.add_segment(brec.name, torch.full((1,), float(init)))
        for k in brec.internal:
            block_of[k] = brec.segment
        bn = model.get_submodule(brec.last_bn)
        if not isinstance(bn, GateMixin):   # its channels are not gated: it carries the block gate alone
            gate_in_place(bn, bank, brec.segment, bn.num_features)
        else:
            bn.bind_block(brec.segment)
    if block_records:
        bank.set_blocks([b.segment for b in block_records], block_of)


def _register_costs(model, bank: GateBank, all_plans, plans, block_records, names, spatial) -> None:
    """The exact ``params`` and ``macs`` cost models and, with blocks, the ``channels`` one, on the bank."""
    block_terms = [(b.segment, {model.get_submodule(n) for n in b.branch}, set(b.internal)) for b in block_records]
    for kind, cm in cost_models(model, plans, bank.sizes, spatial, block_terms).items():
        bank.set_cost(kind, cm)
    if block_records:
        channel_cost = channel_cost_model(bank, all_plans, plans, block_records, names)
        if channel_cost is None:
            bank.unavailable["channels"] = ("the gated blocks have no channels of their own (no channel gates, "
                                            "no channels inside the branches): use cost 'params' or 'macs'")
        else:
            bank.set_cost("channels", channel_cost)


def attach_gates(
    model: nn.Module,
    example_inputs,
    ignored_layers: Iterable | None = None,
    min_channels: int = MIN_CHANNELS,
    round_to: int | None = None,
    ste: str = "identity",
    tau: float = 1.0,
    init: float = 1.0,
    blocks: "bool | Iterable[str]" = False,
    channels: bool = True,
    on_unsupported: str = "raise",
) -> nn.Module:
    """Gate every prunable channel group (and, with ``blocks``, every residual block) of ``model`` in place.

    Args:
        model: any CNN built from standard layers (Conv2d, BatchNorm2d, Linear,
            residual additions, depthwise and grouped convolutions).
        example_inputs: one batch of input (a tensor or tuple of tensors) on the
            model's device; its shapes set the MACs cost model.
        ignored_layers: a list of modules (or of their names) whose output channels stay ungated;
            a single string is refused (TypeError), pass ``["name"]``.
            The classifier (any layer whose outputs reach the model output) is never gated.
        min_channels: :func:`extract` never lets a group drop below this many channels (default 4,
            :mod:`polarprune_cuda.defaults`).
        round_to: :func:`extract` makes every kept width a multiple of this.
        ste, tau, init: gate settings (see :class:`~polarprune_cuda.ChannelGate`);
            ``init > 0`` starts with every gate open, and the model's outputs unchanged.
        blocks: ``True`` gives every residual block one more gate that scales its
            branch (``act(gate * branch(x) + shortcut(x))``; the shortcut always
            stays, a projection shortcut included), or a list of block module names.
            A closed block is replaced by ``act(shortcut(x))`` at extraction. Blocks
            are recognised as described in :mod:`polarprune_cuda.surgery.blocks`.
        channels: gate channel groups (default). ``channels=False, blocks=True``
            gates whole blocks only.
        on_unsupported: ``"raise"`` (default): a model with channel groups that cannot be
            gated is refused with one UnsupportedModelError naming every such group and why;
            ``"skip"``: those groups stay ungated (one warning lists them) and the rest are gated.

    The gate scores live in ``model.polarprune_bank`` (block gates are segments
    of one gate, after the channel segments); the cost models ``channels``,
    ``params`` and ``macs`` are registered on it for
    :class:`~polarprune_cuda.PolarizationLoss`. A block gate costs what its
    branch costs, and channel gates inside a closed branch stop counting. State-
    dict keys of the original parameters do not change.
    """
    check_model_arg(model)
    inputs = as_inputs(example_inputs)
    check_placement(model, inputs)
    check_guard_args(min_channels, round_to)
    if on_unsupported not in ON_UNSUPPORTED:
        raise ValueError(f"on_unsupported must be one of {', '.join(map(repr, ON_UNSUPPORTED))}, "
                         f"got {on_unsupported!r}")
    blocks = _check_options(model, init, channels, blocks, ignored_layers)
    names = {m: n for n, m in model.named_modules()}
    ignored = _ignored_modules(model, names, ignored_layers)
    bank = GateBank(ste=ste, tau=tau)   # validates ste/tau before any change to the model
    spatial = io_shapes(model, inputs)  # runs the model once: example_inputs that do not fit raise here

    block_records = prepare_blocks(model, names, inputs, blocks) if blocks is not False else []
    if blocks is not False and not block_records:
        raise UnsupportedModelError("blocks=True, but the model has no residual block that can be block-gated "
                                    "(see polarprune_cuda.surgery.blocks for what a block must look like)")
    all_plans, refused = channel_plans(model, inputs, names, ignored)
    if channels:
        _refuse_or_skip(refused, on_unsupported)
    plans = all_plans if channels else []
    if channels and not plans and not block_records:
        if refused:
            listing = "\n".join(f"  - {r}" for r in refused)
            raise UnsupportedModelError(f"no channel group of the model can be gated:\n{listing}")
        raise UnsupportedModelError("no prunable channel group found (every group is ignored or is the classifier)")
    block_records = block_exactness(block_records, plans, names, blocks is True)
    dense = count(model, inputs)
    dense_depth = depth(model, inputs) if block_records else None

    records = _gate_groups(bank, plans, names, init)
    _gate_blocks(model, bank, block_records, init)
    bank.to(model_device(model))
    install_bank(model, bank)
    _register_costs(model, bank, all_plans, plans, block_records, names, spatial)
    bank.surgery = SurgeryRecord(
        groups=records,
        input_shapes=[list(t.shape) for t in inputs],
        input_dtypes=[dtype_name(t.dtype) for t in inputs],
        min_channels=min_channels,
        round_to=round_to,
        dense=dense,
        blocks=block_records,
        dense_depth=dense_depth,
    )
    return model


def _channel_energy(module: nn.Module, role: str) -> torch.Tensor:
    """Per channel of ``module`` on the group's side (``role``): the sum of squares of every weight that touches
    it (an output channel's filter, a BatchNorm's scale, or an input channel's column in every filter that reads
    it, grouped convolutions included)."""
    w = module.weight.detach().double().cpu()
    if role == "out" or isinstance(module, nn.BatchNorm2d):
        return w.reshape(w.shape[0], -1).pow(2).sum(1)
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        per_group = w.view(module.groups, w.shape[0] // module.groups, w.shape[1], -1).pow(2).sum((1, 3))
        return per_group.reshape(-1)          # input channel g * (C_in / groups) + k
    return w.reshape(w.shape[0], w.shape[1], -1).pow(2).sum((0, 2))


@torch.no_grad()
def scores_from_magnitude(model: nn.Module, low: float = 0.25, high: float = 2.0) -> None:
    """Set the gate scores of a gated, pretrained model from its weights: within each channel group, the channels
    ranked by the L2 norm of the group's weights that touch them (the producers' filters, the BatchNorms' scales,
    the consumers' input columns: Torch-Pruning's group L2 magnitude), the scores spread from ``low`` to ``high``
    by rank. Every gate stays open (``low > 0``), so the model's outputs are unchanged; the penalty then closes
    the weakest channels of each group first, and a freeze ranks them this way where the scores have not moved.
    What it does for the one pass from a pretrained model:
    benchmarks/results/pretrained-start-levers-fashion-12k.md."""
    if not 0 < low < high:
        raise ValueError(f"low and high must satisfy 0 < low < high (every gate open), got {low!r}, {high!r}")
    bank, record = surgery_of(model)
    modules = dict(model.named_modules())
    for group in record.groups:
        if group.present is not None:
            raise ValueError(f"group {group.name!r} lost channels to a shrink: rank the scores before any shrink")
        norms = torch.zeros(group.channels, dtype=torch.float64)
        for role, name, idxs, root_idxs in group.members:
            energy = _channel_energy(modules[name], role)
            norms.index_add_(0, torch.tensor(root_idxs), energy[torch.tensor(idxs)])
        norms = norms.view(group.repeat, group.size).sum(0)
        ranks = norms.argsort(stable=True).argsort().double()
        seg = bank.segment_scores(bank.names.index(group.name))
        seg.copy_((low + (high - low) * ranks / max(group.size - 1, 1)).to(seg))
