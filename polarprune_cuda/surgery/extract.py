"""extract: the static sub-network of a gated model, and what it will be before it is taken.

:func:`kept_channels` (open gates plus the ``min_channels``/``round_to`` guard), :func:`removed_blocks`,
:func:`predicted_count` and :func:`predicted_depth` read the gates; :func:`extract` removes the closed
channels physically (Torch-Pruning's group pruning), replaces closed blocks by their shortcut, folds
the gates away and checks on the example input that the eval outputs equal the gated model's.
"""
from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..gates.bank import GateBank, remove_bank
from ..gates.modules import GateMixin, fold_in_place
from .attach import GroupRecord, SurgeryRecord, check_guard_args, surgery_of
from .blocks import BlockRecord, close_blocks
from .inputs import (as_inputs, check_fits, model_device, random_inputs, score_ids, eval_mode, flatten_outputs,
                     index_maps_of, index_probe)
from .spec import build_spec
from .tp import remove_channels


def _check_finite_model(model: nn.Module) -> None:
    """ValueError naming the first floating parameter or buffer (gate scores aside) that holds NaN or inf."""
    skip = score_ids(model)
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if id(t) in skip or not (t.is_floating_point() or t.is_complex()):
                continue
            if not bool(torch.isfinite(t.detach()).all()):
                raise ValueError(f"model {kind} {name!r} holds NaN or inf; extraction needs finite weights and "
                                 "BatchNorm statistics (check the training run, e.g. its learning rate)")


def guard(rec: GroupRecord, min_channels: int, round_to: int | None) -> tuple[int, int]:
    """(the fewest gates of the group's segment that extraction keeps, the step its kept width moves in):
    widths are at least ``min_channels`` channels and multiples of ``round_to`` (or the whole group)."""
    need = min(rec.size, math.ceil(min(min_channels, rec.channels) / rec.repeat))
    step = round_to // math.gcd(round_to, rec.repeat) if round_to else 1
    return need, step


def kept_channels(model, min_channels: int | None = None, round_to: int | None = None,
                  warn: bool = True) -> list[Tensor]:
    """Per gate segment, the boolean mask of channels extraction keeps (open gates plus the guard's).

    A block gate's segment (one gate) says whether the block's branch is kept.
    Channels inside a removed branch go with it, whatever their mask says.
    """
    bank, record = surgery_of(model)
    check_guard_args(min_channels, round_to, none_means="the value given to attach_gates")
    bank.check_finite()
    min_channels = record.min_channels if min_channels is None else min_channels
    round_to = record.round_to if round_to is None else round_to
    chunks = bank.scores.detach().float().cpu().split(bank.sizes)
    masks = []
    for rec, scores in zip(record.groups, chunks):
        keep = scores > 0
        need, step = guard(rec, min_channels, round_to)
        kept = int(keep.sum())
        target = min(rec.size, math.ceil(max(kept, need) / step) * step)
        if target > kept:
            order = torch.argsort(torch.where(keep, torch.full_like(scores, -math.inf), scores), descending=True)
            keep[order[: target - kept]] = True
            if warn and kept < need and not _inside_closed_block(bank, len(masks), chunks):
                warnings.warn(f"group {rec.name!r}: {kept} of {rec.channels} channels open, below min_channels="
                              f"{min_channels}; keeping the {(target - kept) * rec.repeat} highest-scoring closed "
                              "channels", stacklevel=3)
        masks.append(keep)
    masks.extend(chunks[b.segment] > 0 for b in record.blocks)
    return masks


def _inside_closed_block(bank: GateBank, segment: int, chunks) -> bool:
    block = bank.block_of[segment] if segment < len(bank.block_of) else -1
    return block >= 0 and not bool(chunks[block][0] > 0)


def removed_blocks(model) -> list[str]:
    """Names of the blocks whose gate is closed: extraction replaces them by their shortcut."""
    bank, record = surgery_of(model)
    chunks = bank.scores.detach().float().cpu().split(bank.sizes)
    return [b.name for b in record.blocks if not bool(chunks[b.segment][0] > 0)]


def predicted_count(model, min_channels: int | None = None, round_to: int | None = None) -> dict[str, int]:
    """Params and MACs the extracted model will have, from the gates (cost models of attach_gates)."""
    bank, _ = surgery_of(model)
    keep = torch.cat(kept_channels(model, min_channels, round_to, warn=False)).float().to(bank.scores.device)
    keep = bank.effective(keep)
    return {kind: int(round(float(bank.cost_model(kind).cost(keep)))) for kind in ("params", "macs")}


def predicted_depth(model) -> int:
    """Depth (see :func:`~polarprune_cuda.depth`) the extracted model will have: the dense depth less what
    each removed block's branch adds to the longest path (exact for blocks in sequence, as in ResNets)."""
    bank, record = surgery_of(model)
    if record.dense_depth is None:
        raise ValueError("model was gated without blocks: its depth does not change (use pp.depth on the model)")
    closed = set(removed_blocks(model))
    return record.dense_depth - sum(b.depth_saved for b in record.blocks if b.name in closed)


def _folded_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every gate folded into its module (hard gates) and the bank removed."""
    small = copy.deepcopy(model)
    small_bank = small.polarprune_bank
    hard = [g.detach() for g in small_bank.gates()]
    for m in list(small.modules()):
        if isinstance(m, GateMixin):
            if m.plain_class is None:
                raise UnsupportedModelError(f"{type(m).__name__} gates were added by hand; extract handles models "
                                            "gated with attach_gates only")
            fold_in_place(m, m.gate_from(tuple(hard)))
    remove_bank(small)
    small_bank.surgery = None
    return small


def _group_specs(record: SurgeryRecord, masks: list[Tensor], gone: list[BlockRecord]) -> list[dict]:
    """The spec entry of each channel group: its kept channels, or the closed block it goes with."""
    spec_groups = []
    for k, (rec, keep) in enumerate(zip(record.groups, masks)):
        owner = next((b.name for b in gone if k in b.internal), None)
        entry = {"name": rec.name, "root": rec.root, "channels": rec.channels, "repeat": rec.repeat}
        if owner is not None:
            spec_groups.append(entry | {"kept": [], "removed_with": owner})
            continue
        entry["root"] = _surviving_root(rec, gone)
        entry["kept"] = torch.nonzero(keep.repeat(rec.repeat)).flatten().tolist()
        spec_groups.append(entry)
    return spec_groups


def extract(model: nn.Module, example_inputs=None, min_channels: int | None = None,
            round_to: int | None = None, verify: bool = True) -> nn.Module:
    """The static sub-network: closed channels removed, closed blocks replaced, gates folded away.

    A block whose gate is closed becomes a :class:`~polarprune_cuda.surgery.blocks.ClosedBlock`,
    ``act(shortcut(x))``: the model gets shallower. ``min_channels``/``round_to``
    override the values given to attach_gates. With ``verify`` (default) the
    eval-mode outputs of the gated and the extracted model are compared on
    ``example_inputs`` (default: a seeded random batch shaped like
    attach_gates' example) and a mismatch raises. The gated model is not changed.
    Refused up front: ``example_inputs`` the model cannot run on, and NaN or inf in any
    parameter or buffer of the model (ValueError naming it).
    """
    bank, record = surgery_of(model)
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True or False, got {verify!r}")
    masks = kept_channels(model, min_channels, round_to)
    _check_finite_model(model)
    device = model_device(model)
    if example_inputs is None:
        inputs = random_inputs(record.input_shapes, record.input_dtypes, device)
    else:
        inputs = as_inputs(example_inputs)
        check_fits(model, inputs)
    small, spec_groups, block_specs = _take(model, record, masks, device, dtype=_weights_dtype(model))
    small.train(model.training)
    small.polarprune_spec = build_spec(small, record, spec_groups, block_specs)
    if verify:
        _verify(model, small, inputs, spec_groups)
    return small


def _weights_dtype(model: nn.Module) -> torch.dtype | None:
    """The one floating dtype of the model's parameters (None where they mix dtypes or there are none): a model
    moved to another dtype after attach_gates is traced with inputs of its own dtype, not the recorded one."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _take(model: nn.Module, record: SurgeryRecord, masks: list[Tensor], device,
          dtype: torch.dtype | None = None) -> tuple[nn.Module, list[dict], list[dict]]:
    """(the folded copy of ``model`` with the closed blocks replaced and the channels ``masks`` does not keep
    removed, its spec groups, its block specs). ``dtype``: the floating dtype of the inputs Torch-Pruning traces
    with (default: the recorded ones; a float64 copy needs float64)."""
    closed = set(removed_blocks(model))
    small = _folded_copy(model)
    block_specs = [b.to_spec(b.name in closed) for b in record.blocks]
    spec_groups = _group_specs(record, masks, [b for b in record.blocks if b.name in closed])
    inputs = random_inputs(record.input_shapes, record.input_dtypes, device)
    if dtype is not None:
        inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    try:
        close_blocks(small, block_specs)
        remove_channels(small, _now(record, spec_groups), inputs)
    except UnsupportedModelError:
        raise
    except Exception as exc:   # Torch-Pruning's channel removal on a model it cannot follow
        raise UnsupportedModelError(f"removing the closed channels failed ({type(exc).__name__}: {exc}); "
                                    f"{_group_list(spec_groups)}") from exc
    return small, spec_groups, block_specs


def _now(record: SurgeryRecord, spec_groups: list[dict]) -> list[dict]:
    """The spec groups in the numbering of the channels the layers hold now: a group that shrank while training
    (shrink.py) holds only its ``present`` channels; the spec keeps the dense numbering."""
    out = []
    for rec, g in zip(record.groups, spec_groups):
        if rec.present is None or "removed_with" in g:
            out.append(g)
            continue
        position = {ch: i for i, ch in enumerate(rec.present)}
        missing = [ch for ch in g["kept"] if ch not in position]
        if missing:
            raise UnsupportedModelError(f"group {rec.name!r} keeps channel {missing[0]}, which was removed while "
                                        "training")
        out.append({**g, "channels": len(rec.present), "kept": [position[ch] for ch in g["kept"]]})
    return out


def index_maps(model: nn.Module, min_channels: int | None = None, round_to: int | None = None) -> dict[str, Tensor]:
    """Where :func:`extract`'s tensors come from: for every floating parameter and buffer of the extracted model
    (by state-dict name, which extraction keeps), the flat indices into the gated model's tensor of the same
    name that its elements are taken from, in its own shape; -1 where extraction writes a zero (a closed
    channel the ``min_channels``/``round_to`` guard keeps).

    Found by running the same extraction on a float64 copy whose every element holds its own flat index
    (plus one): channel removal only selects elements, so the values that arrive are the indices. Used to
    carry per-element state (momentum buffers) from the gated to the extracted model and back.
    """
    bank, record = surgery_of(model)
    masks = kept_channels(model, min_channels, round_to, warn=False)
    probe, _ = index_probe(model)
    small, _, _ = _take(probe, record, masks, model_device(model), dtype=torch.float64)
    return index_maps_of(small, "extraction")


def _group_list(spec_groups: list[dict]) -> str:
    changed = [g["name"] for g in spec_groups if len(g["kept"]) < g["channels"] and "removed_with" not in g]
    shown = ", ".join(repr(n) for n in changed[:8]) + (", ..." if len(changed) > 8 else "")
    return (f"the groups that lost channels: {shown}; add their root layers to ignored_layers (or attach_gates "
            "with on_unsupported='skip' after naming them)" if changed else "no group lost channels")


def _surviving_root(rec: GroupRecord, gone: list[BlockRecord]) -> str:
    """A layer producing the group's channels that is still in the model after the closed blocks went."""
    removed = {n for b in gone for n in b.branch}
    for name in [rec.root, *rec.producers]:
        if name not in removed:
            return name
    raise UnsupportedModelError(f"every layer producing the channels of group {rec.name!r} is inside a removed "
                                "block, yet the group reaches outside it")


def _verify(gated: nn.Module, small: nn.Module, inputs, spec_groups: list[dict]) -> None:
    """UnsupportedModelError unless ``small``'s eval outputs on ``inputs`` equal ``gated``'s (shapes, and values
    to 1e-3 of the largest output); an extracted model that cannot run is refused naming the groups. Outputs
    that are not finite (finite weights too large: a diverged training) are named as such first: no output
    comparison means anything then (non-finite weights were refused before, by _check_finite_model)."""
    with eval_mode(gated, small), torch.no_grad():
        ref = gated(*inputs)
        try:
            out = small(*inputs)
        except Exception as exc:
            raise UnsupportedModelError(f"the extracted model cannot run ({type(exc).__name__}: {exc}); "
                                        f"{_group_list(spec_groups)}") from exc
    if any(a.is_floating_point() and not bool(torch.isfinite(a).all()) for a in flatten_outputs(ref)):
        raise ValueError("the model's outputs are not finite (NaN or inf) though its weights are: they are too "
                         "large, the training diverged (lower the learning rate)")
    for a, b in zip(flatten_outputs(ref), flatten_outputs(out)):
        if a.shape != b.shape:
            raise UnsupportedModelError(f"extracted model output shape {tuple(b.shape)} differs from the gated "
                                        f"model's {tuple(a.shape)}")
        scale = a.abs().max().item() if a.numel() else 0.0
        err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
        if not err <= 1e-3 * scale + 1e-5:
            raise UnsupportedModelError(
                f"the extracted model's outputs differ from the gated model's (max |diff| {err:.3g}, max |out| "
                f"{scale:.3g}): an op in the model does not keep closed channels at zero (for example an added "
                "constant or a non-zero activation at 0). Add the producing layers to ignored_layers")
