"""Model surgery: gate any CNN in one call, extract the static sub-network, save and reload it.

* :func:`attach_gates` finds the coupled channel groups of a model with
  Torch-Pruning's ``DependencyGraph`` (residual additions, depthwise and
  grouped convolutions couple channels), gives each group one gate segment in
  the model's :class:`~polarprune_cuda.GateBank`, and gates the group's
  BatchNorms (``gamma * g``, ``beta * g``) or, where no BatchNorm follows a
  producer, its output-channel weights. It registers exact params and MACs
  cost models for :class:`~polarprune_cuda.PolarizationLoss`.
* :func:`extract` removes the closed channels physically (Torch-Pruning's
  group pruning), folds the gates away and returns a plain module whose eval
  outputs equal the gated model's; it checks that on the example input.
* :func:`save_pruned` / :func:`load_pruned`: a human-readable JSON channel
  spec plus a ``state_dict``; loading rebuilds from the user's own model class
  and reads the weights with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ._io import atomic_write
from .blocks import BlockRecord, close_blocks, depth, prepare_blocks
from .cost import CostModel
from .gates import (
    GATED_CLASS,
    GateBank,
    GateMixin,
    find_bank,
    fold_in_place,
    gate_modules,
    gate_in_place,
    install_bank,
    remove_bank,
)

SPEC_FORMAT = 1
SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.pt"


class UnsupportedModelError(ValueError):
    """The model has a structure whose channels cannot be gated and removed exactly."""


@dataclass
class GroupRecord:
    """One coupled channel group and its gate segment."""

    name: str                 # segment name (the root module's name)
    root: str                 # module whose output channels are the group (Torch-Pruning root)
    channels: int             # channels of the group
    repeat: int = 1           # the segment's gates tile this many times (grouped convolutions)
    gated: list[str] = field(default_factory=list)   # modules gated in place
    producers: list[str] = field(default_factory=list)   # layers whose output channels are the group

    @property
    def size(self) -> int:
        return self.channels // self.repeat


@dataclass
class SurgeryRecord:
    """What attach_gates did, kept on the bank for extract()."""

    groups: list[GroupRecord]
    input_shapes: list[list[int]]
    input_dtypes: list[str]
    min_channels: int
    round_to: int | None
    dense: dict[str, int]
    blocks: list[BlockRecord] = field(default_factory=list)
    dense_depth: int | None = None


# ----------------------------------------------------------------------------- helpers

def _as_inputs(example_inputs) -> tuple[Tensor, ...]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(isinstance(t, Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a tensor (or a tuple of tensors) shaped like one batch of model "
                    f"input, e.g. torch.randn(1, 3, 224, 224); got {type(example_inputs).__name__}")


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _random_inputs(record: SurgeryRecord, device) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for shape, dtype in zip(record.input_shapes, record.input_dtypes):
        dt = getattr(torch, dtype)
        if dt.is_floating_point:
            out.append(torch.randn(*shape, generator=gen).to(device=device, dtype=dt))
        else:
            out.append(torch.zeros(*shape, dtype=dt, device=device))
    return tuple(out)


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def _tp():
    import torch_pruning as tp

    return tp


def _build_graph(model: nn.Module, inputs: tuple[Tensor, ...]):
    """Torch-Pruning's dependency graph of ``model``; training mode and grad mode are restored."""
    tp = _tp()
    was_training = model.training
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)
    except Exception as exc:  # tracing runs the user's forward
        raise UnsupportedModelError(f"Torch-Pruning could not trace the model on example_inputs: "
                                    f"{type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
    return graph


def _output_layers(graph) -> list[nn.Module]:
    """Conv/Linear layers whose outputs reach the model output through shape-preserving ops only."""
    tp = _tp()
    T = tp.ops.OPTYPE
    layer_types = (T.CONV, T.LINEAR, T.DEPTHWISE_CONV)
    passthrough = (T.ELEMENTWISE, T.RESHAPE, T.OUTPUT, T.CONCAT, T.SPLIT, T.SLICE, T.UNBIND, T.EXPAND)
    found, stack, seen = [], [n for n in graph.module2node.values() if not n.outputs], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.type in layer_types:
            found.append(node.module)
        elif node.type in passthrough or node.type == T.BN:
            stack.extend(node.inputs)
    return found


def _is_custom_function(grad_fn) -> bool:
    return isinstance(grad_fn, torch.autograd.function.BackwardCFunction)


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


class _Plan:
    """Roles of the modules of one group (computed from a Torch-Pruning group)."""

    def __init__(self, graph, group, names: dict[nn.Module, str]):
        tp = _tp()
        T = tp.ops.OPTYPE
        self.root_module = group[0].dep.target.module
        self.root = names[self.root_module]
        self.channels = len(group[0].idxs)
        self.bns: list[nn.Module] = []
        self.producers: list[nn.Module] = []
        self.inputs: list[tuple[nn.Module, list[int], list[int]]] = []   # (module, idxs, root_idxs)
        self.outputs: list[tuple[nn.Module, list[int], list[int]]] = []
        self.repeat = 1
        for item in group:
            dep, idxs, root_idxs = item.dep, list(item.idxs), list(item.root_idxs)
            node, module = dep.target, dep.target.module
            label = names.get(module, getattr(module, "_name", str(module)))
            if _is_custom_function(node.grad_fn):
                raise UnsupportedModelError(
                    f"custom autograd function {type(node.grad_fn).__name__} is in the channel path of "
                    f"{self.root!r}; Torch-Pruning cannot see what it does to channels. Add {self.root!r} to "
                    "ignored_layers or use standard ops")
            if node.type in (T.ELEMENTWISE,) and "Unknown" in label:
                raise UnsupportedModelError(f"an operation Torch-Pruning cannot trace is in the channel path of "
                                            f"{self.root!r}; add {self.root!r} to ignored_layers")
            out_fn = graph.is_out_channel_pruning_fn(dep.handler)
            if node.type == T.BN:
                if type(module) is not nn.BatchNorm2d or not module.affine:
                    raise UnsupportedModelError(
                        f"{label} ({type(module).__name__}) is in the channel group of {self.root!r}, but only "
                        f"affine nn.BatchNorm2d can be gated; add {self.root!r} to ignored_layers")
                self._require_whole(module, label, idxs, root_idxs, module.num_features)
                self.bns.append(module)
                self.outputs.append((module, idxs, root_idxs))
            elif node.type in (T.CONV, T.LINEAR, T.DEPTHWISE_CONV):
                if isinstance(module, nn.Conv2d) and module.groups > 1 and node.type != T.DEPTHWISE_CONV:
                    self.repeat = _lcm(self.repeat, module.groups)
                if node.type == T.DEPTHWISE_CONV or out_fn:
                    self._require_whole(module, label, idxs, root_idxs, module.weight.shape[0])
                    self.producers.append(module)
                    self.outputs.append((module, idxs, root_idxs))
                else:
                    self.inputs.append((module, idxs, root_idxs))
            elif node.type in (T.ELEMENTWISE, T.RESHAPE, T.CONCAT, T.SPLIT, T.SLICE, T.UNBIND, T.EXPAND, T.OUTPUT):
                continue
            else:
                raise UnsupportedModelError(
                    f"{label} ({type(module).__name__}) is in the channel group of {self.root!r}; gates cannot be "
                    f"folded through it. Add {self.root!r} to ignored_layers")
        if self.channels % self.repeat:
            raise UnsupportedModelError(f"group {self.root!r} has {self.channels} channels, not a multiple of the "
                                        f"grouped convolutions' {self.repeat} groups")
        self.weight_gated = []
        bn_nodes = {graph.module2node[b] for b in self.bns}
        for p in self.producers:
            nxt = graph.module2node[p].outputs
            if len(nxt) == 1 and nxt[0] in bn_nodes:
                continue
            if type(p) not in GATED_CLASS:
                raise UnsupportedModelError(
                    f"{names[p]} ({type(p).__name__}) produces channels of group {self.root!r} with no BatchNorm "
                    f"after it, and only plain nn.Conv2d/nn.Linear can be gated through their weights; add "
                    f"{self.root!r} to ignored_layers")
            self.weight_gated.append(p)

    def _require_whole(self, module, label, idxs, root_idxs, channels) -> None:
        if len(idxs) != channels or idxs != root_idxs:
            raise UnsupportedModelError(
                f"{label} mixes channels of several groups (e.g. after a concatenation), which this version "
                f"cannot gate; add {self.root!r} to ignored_layers")


def _io_shapes(model: nn.Module, inputs) -> dict[nn.Module, tuple[int, int]]:
    """Per conv/linear: (output elements per sample / output channels, batch size)."""
    spatial: dict[nn.Module, int] = {}

    def hook(module, args, out):
        per_sample = out[0].numel() if out.dim() > 1 else 1
        channels = out.shape[1] if isinstance(module, nn.Conv2d) else out.shape[-1]
        spatial[module] = per_sample // channels

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return spatial


def count(model: nn.Module, example_inputs) -> dict[str, int]:
    """Params and MACs (per sample, multiply-accumulates of Conv2d and Linear layers) of ``model``.

    Gate scores are not counted: they disappear at extraction.
    """
    _check_model(model)
    inputs = _as_inputs(example_inputs)
    bank = find_bank(model)
    skip = {id(bank.scores)} if bank is not None else set()
    params = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    spatial = _io_shapes(model, inputs)
    macs = 0
    for m, positions in spatial.items():
        if isinstance(m, nn.Conv2d):
            k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
            macs += positions * m.out_channels * k
        else:
            macs += positions * m.out_features * m.in_features
    return {"params": int(params), "macs": int(macs)}


def _cost_models(model, plans: list[_Plan], sizes: list[int], spatial,
                 blocks: list[tuple[int, set, set[int]]] = ()) -> dict[str, CostModel]:
    """Exact params and MACs as functions of the gates (see cost.py).

    ``plans`` are the groups that have gate segments 0..K-1 (``sizes``).
    ``blocks`` lists (block segment, modules of its branch, channel segments
    inside the branch). Every cost of a branch module is multiplied by its
    block gate: a constant becomes linear in the block gate, a term linear in
    a segment outside the branch becomes a pair with the block gate, and terms
    in segments inside the branch stay as they are, because the penalty feeds
    those segments the effective probabilities ``p_j * p_block``
    (:meth:`GateBank.effective_scores`).
    """
    seg_of_module_out: dict[nn.Module, list[tuple[int, float]]] = {}
    seg_of_module_in: dict[nn.Module, list[tuple[int, float]]] = {}
    covered_out: dict[nn.Module, int] = {}
    covered_in: dict[nn.Module, int] = {}
    for k, plan in enumerate(plans):
        for module, idxs, root_idxs in plan.outputs:
            seg_of_module_out.setdefault(module, []).append((k, len(idxs) / sizes[k]))
            covered_out[module] = covered_out.get(module, 0) + len(idxs)
        for module, idxs, root_idxs in plan.inputs:
            seg_of_module_in.setdefault(module, []).append((k, len(idxs) / sizes[k]))
            covered_in[module] = covered_in.get(module, 0) + len(idxs)
    block_of_module = {id(m): (seg, internal) for seg, members, internal in blocks for m in members}

    costs = {"params": ({}, {}, [0.0]), "macs": ({}, {}, [0.0])}

    def sink(kind, module):
        """(add to linear, add to pairs, add to const) for one module's terms, times its block gate."""
        linear, pairs, const = costs[kind]
        found = block_of_module.get(id(module))

        def lin(a, c):
            if found is None or a in found[1]:
                linear[a] = linear.get(a, 0.0) + c
            else:
                key = (a, found[0])
                pairs[key] = pairs.get(key, 0.0) + c

        def pair(a, b, c):
            if found is not None and a not in found[1] and b not in found[1]:
                raise UnsupportedModelError("a branch layer maps gated channels outside its block to gated channels "
                                            "outside its block")   # refused earlier, in _block_exactness
            pairs[(a, b)] = pairs.get((a, b), 0.0) + c

        def fixed(c):
            if found is None:
                const[0] += c
            else:
                linear[found[0]] = linear.get(found[0], 0.0) + c

        return lin, pair, fixed

    def add_product(kind, module, coef, left, f_left, right, f_right):
        lin, pair, fixed = sink(kind, module)
        for a, ma in left:
            lin(a, coef * ma * f_right)
            for b, mb in right:
                pair(a, b, coef * ma * mb)
        for b, mb in right:
            lin(b, coef * mb * f_left)
        fixed(coef * f_left * f_right)

    def add_linear(kind, module, coef, terms, f):
        lin, _, fixed = sink(kind, module)
        for a, ma in terms:
            lin(a, coef * ma)
        fixed(coef * f)

    counted = set()
    bank = find_bank(model)
    for m in model.modules():
        if m is bank:
            continue
        outs = seg_of_module_out.get(m, [])
        ins = seg_of_module_in.get(m, [])
        if isinstance(m, nn.Conv2d):
            counted.update(id(p) for p in m.parameters(recurse=False))
            f_out = m.out_channels - covered_out.get(m, 0)
            kk = m.weight.shape[2] * m.weight.shape[3]
            positions = spatial.get(m, 0)
            if m.groups > 1 and m.groups == m.out_channels == m.in_channels:   # depthwise: in == out
                add_linear("params", m, kk + (m.bias is not None), outs, f_out)
                add_linear("macs", m, kk * positions, outs, f_out)
                continue
            f_in = m.in_channels - covered_in.get(m, 0)
            add_product("params", m, kk / m.groups, ins, f_in, outs, f_out)
            add_product("macs", m, positions * kk / m.groups, ins, f_in, outs, f_out)
            if m.bias is not None:
                add_linear("params", m, 1.0, outs, f_out)
        elif isinstance(m, nn.Linear):
            counted.update(id(p) for p in m.parameters(recurse=False))
            f_out = m.out_features - covered_out.get(m, 0)
            f_in = m.in_features - covered_in.get(m, 0)
            add_product("params", m, 1.0, ins, f_in, outs, f_out)
            add_product("macs", m, float(spatial.get(m, 0)), ins, f_in, outs, f_out)
            if m.bias is not None:
                add_linear("params", m, 1.0, outs, f_out)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            counted.update(id(p) for p in m.parameters(recurse=False))
            add_linear("params", m, 2.0, outs, m.num_features - covered_out.get(m, 0))
    skip = {id(bank.scores)} if bank is not None else set()
    costs["params"][2][0] += sum(p.numel() for p in model.parameters() if id(p) not in counted | skip)
    n = sum(sizes)
    return {kind: CostModel.from_terms(n, sizes, lin, pairs, const[0]) for kind, (lin, pairs, const) in costs.items()}


# ----------------------------------------------------------------------------- attach

def attach_gates(
    model: nn.Module,
    example_inputs,
    ignored_layers: Iterable | None = None,
    min_channels: int = 8,
    round_to: int | None = None,
    ste: str = "identity",
    tau: float = 1.0,
    init: float = 1.0,
    blocks: "bool | Iterable[str]" = False,
    channels: bool = True,
) -> nn.Module:
    """Gate every prunable channel group (and, with ``blocks``, every residual block) of ``model`` in place.

    Args:
        model: any CNN built from standard layers (Conv2d, BatchNorm2d, Linear,
            residual additions, depthwise and grouped convolutions).
        example_inputs: one batch of input (a tensor or tuple of tensors) on the
            model's device; its shapes set the MACs cost model.
        ignored_layers: modules (or their names) whose output channels stay ungated.
            The classifier (any layer whose outputs reach the model output) is never gated.
        min_channels: :func:`extract` never lets a group drop below this many channels.
        round_to: :func:`extract` makes every kept width a multiple of this.
        ste, tau, init: gate settings (see :class:`~polarprune_cuda.ChannelGate`);
            ``init > 0`` starts with every gate open, and the model's outputs unchanged.
        blocks: ``True`` gives every residual block one more gate that scales its
            branch (``act(gate * branch(x) + shortcut(x))``; the shortcut always
            stays, a projection shortcut included), or a list of block module names.
            A closed block is replaced by ``act(shortcut(x))`` at extraction. Blocks
            are recognised as described in :mod:`polarprune_cuda.blocks`.
        channels: gate channel groups (default). ``channels=False, blocks=True``
            gates whole blocks only.

    The gate scores live in ``model.polarprune_bank`` (block gates are segments
    of one gate, after the channel segments); the cost models ``channels``,
    ``params`` and ``macs`` are registered on it for
    :class:`~polarprune_cuda.PolarizationLoss`. A block gate costs what its
    branch costs, and channel gates inside a closed branch stop counting. State-
    dict keys of the original parameters do not change.
    """
    _check_model(model)
    inputs = _as_inputs(example_inputs)
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be an int >= 1, got {min_channels!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be None or an int >= 1, got {round_to!r}")
    if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
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
    names = {m: n for n, m in model.named_modules()}
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
    bank = GateBank(ste=ste, tau=tau)   # validates ste/tau before any change to the model

    block_records = prepare_blocks(model, names, inputs, blocks) if blocks is not False else []
    if blocks is not False and not block_records:
        raise UnsupportedModelError("blocks=True, but the model has no residual block that can be block-gated "
                                    "(see polarprune_cuda.blocks for what a block must look like)")
    graph = _build_graph(model, inputs)
    outputs = _output_layers(graph)
    groups = list(graph.get_all_groups(ignored_layers=ignored + outputs, root_module_types=(nn.Conv2d, nn.Linear)))
    all_plans = [_Plan(graph, g, names) for g in groups]
    order = {n: i for i, n in enumerate(names.values())}
    all_plans = sorted((p for p in all_plans if p.bns or p.weight_gated), key=lambda p: order[p.root])
    plans = all_plans if channels else []
    if channels and not plans and not block_records:
        raise UnsupportedModelError("no prunable channel group found (every group is ignored or is the classifier)")
    block_records = _block_exactness(block_records, plans, names, blocks is True)
    spatial = _io_shapes(model, inputs)
    dense = count(model, inputs)
    dense_depth = depth(model, inputs) if block_records else None

    records = []
    for plan in plans:
        index = bank.add_segment(plan.root, torch.full((plan.channels // plan.repeat,), float(init)))
        rec = GroupRecord(plan.root, plan.root, plan.channels, plan.repeat,
                          producers=[names[m] for m in plan.producers])
        for module in plan.bns + plan.weight_gated:
            gate_in_place(module, bank, index, plan.repeat)
            rec.gated.append(names[module])
        records.append(rec)
    block_of: dict[int, int] = {}
    for brec in block_records:
        brec.segment = bank.add_segment(brec.name, torch.full((1,), float(init)))
        for k in brec.internal:
            block_of[k] = brec.segment
        bn = model.get_submodule(brec.last_bn)
        if not isinstance(bn, GateMixin):   # its channels are not gated: it carries the block gate alone
            gate_in_place(bn, bank, brec.segment, bn.num_features)
        else:
            bn._bind_block(brec.segment)
    if block_records:
        bank.set_blocks([b.segment for b in block_records], block_of)
    bank.to(_model_device(model))
    install_bank(model, bank)
    block_terms = [(b.segment, {model.get_submodule(n) for n in b.branch}, set(b.internal)) for b in block_records]
    for kind, cm in _cost_models(model, plans, bank.sizes, spatial, block_terms).items():
        bank.set_cost(kind, cm)
    if block_records:
        channel_cost = _channel_cost(bank, all_plans, plans, block_records, names)
        if channel_cost is None:
            bank.unavailable["channels"] = ("the gated blocks have no channels of their own (no channel gates, "
                                            "no channels inside the branches): use cost 'params' or 'macs'")
        else:
            bank.set_cost("channels", channel_cost)
    bank.surgery = SurgeryRecord(
        groups=records,
        input_shapes=[list(t.shape) for t in inputs],
        input_dtypes=[str(t.dtype).replace("torch.", "") for t in inputs],
        min_channels=min_channels,
        round_to=round_to,
        dense=dense,
        blocks=block_records,
        dense_depth=dense_depth,
    )
    return model


def _block_exactness(block_records: list[BlockRecord], plans: list[_Plan], names, auto: bool) -> list[BlockRecord]:
    """Find each block's inside channel segments; drop blocks whose cost is not exact with one gate per segment.

    A segment is inside a block when every module of its group is in the
    branch. A branch layer that maps gated channels outside the block to gated
    channels outside the block would make its cost a product of three gates,
    which the penalty op does not represent: such a block is skipped (warned)
    or, when the user named it, refused.
    """
    kept = []
    for brec in block_records:
        branch = set(brec.branch)
        brec.internal = []
        outside_segments: dict[str, set[int]] = {}
        for k, plan in enumerate(plans):
            modules = {names[m] for m, _, _ in plan.outputs + plan.inputs}
            if modules <= branch:
                brec.internal.append(k)
            for m, _, _ in plan.outputs:
                outside_segments.setdefault(names[m], set()).add(("out", k))
            for m, _, _ in plan.inputs:
                outside_segments.setdefault(names[m], set()).add(("in", k))
        bad = None
        for layer in brec.branch:
            tags = outside_segments.get(layer, set())
            outs = {k for side, k in tags if side == "out" and k not in brec.internal}
            ins = {k for side, k in tags if side == "in" and k not in brec.internal}
            if outs and ins:
                bad = layer
                break
        if bad is None:
            kept.append(brec)
            continue
        message = (f"block {brec.name!r} is not block-gated: its layer {bad!r} maps gated channels outside the "
                   "block to gated channels outside the block (add that layer's group to ignored_layers to gate it)")
        if not auto:
            raise UnsupportedModelError(message)
        warnings.warn(message, stacklevel=3)
    return kept


def _channel_cost(bank: GateBank, all_plans, plans, block_records, names) -> CostModel | None:
    """``channels`` cost with block gates: each channel gate costs 1; a block gate costs the channels of
    its branch that no channel gate covers (with channel gates on, those inside the branch count
    through ``p_j * p_block`` already)."""
    gated = {id(p) for p in plans}
    linear = {k: 1.0 for k in range(len(plans))}
    for brec in block_records:
        branch = set(brec.branch)
        linear[brec.segment] = float(sum(p.channels for p in all_plans if id(p) not in gated
                                         and {names[m] for m, _, _ in p.outputs + p.inputs} <= branch))
    if not any(linear.values()):
        return None
    return CostModel.from_terms(bank.scores.numel(), bank.sizes, linear, {}, 0.0)


# ----------------------------------------------------------------------------- extract

def _surgery(model) -> tuple[GateBank, SurgeryRecord]:
    _check_model(model)
    bank = find_bank(model)
    record = getattr(bank, "surgery", None) if bank is not None else None
    if record is None:
        raise ValueError("model has no gates from attach_gates (call pp.attach_gates(model, example_inputs) first)")
    return bank, record


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
    bank, record = _surgery(model)
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
    bank, record = _surgery(model)
    chunks = bank.scores.detach().float().cpu().split(bank.sizes)
    return [b.name for b in record.blocks if not bool(chunks[b.segment][0] > 0)]


def predicted_count(model, min_channels: int | None = None, round_to: int | None = None) -> dict[str, int]:
    """Params and MACs the extracted model will have, from the gates (cost models of attach_gates)."""
    bank, _ = _surgery(model)
    keep = torch.cat(kept_channels(model, min_channels, round_to, warn=False)).float().to(bank.scores.device)
    keep = bank.effective(keep)
    return {kind: int(round(float(bank.cost_model(kind).cost(keep)))) for kind in ("params", "macs")}


def predicted_depth(model) -> int:
    """Depth (see :func:`~polarprune_cuda.depth`) the extracted model will have: the dense depth less what
    each removed block's branch adds to the longest path (exact for blocks in sequence, as in ResNets)."""
    bank, record = _surgery(model)
    if record.dense_depth is None:
        raise ValueError("model was gated without blocks: its depth does not change (use pp.depth on the model)")
    closed = set(removed_blocks(model))
    return record.dense_depth - sum(b.depth_saved for b in record.blocks if b.name in closed)


def extract(model: nn.Module, example_inputs=None, min_channels: int | None = None,
            round_to: int | None = None, verify: bool = True) -> nn.Module:
    """The static sub-network: closed channels removed, closed blocks replaced, gates folded away.

    A block whose gate is closed becomes a :class:`~polarprune_cuda.blocks.ClosedBlock`,
    ``act(shortcut(x))``: the model gets shallower. ``min_channels``/``round_to``
    override the values given to attach_gates. With ``verify`` (default) the
    eval-mode outputs of the gated and the extracted model are compared on
    ``example_inputs`` (default: a seeded random batch shaped like
    attach_gates' example) and a mismatch raises. The gated model is not changed.
    """
    bank, record = _surgery(model)
    masks = kept_channels(model, min_channels, round_to)
    device = _model_device(model)
    inputs = _random_inputs(record, device) if example_inputs is None else _as_inputs(example_inputs)
    closed = set(removed_blocks(model))

    small = copy.deepcopy(model)
    small_bank = small.polarprune_bank
    hard = [g.detach() for g in small_bank.gates()]
    for m in list(small.modules()):
        if isinstance(m, GateMixin):
            if getattr(m, "_pp_plain_class", None) is None:
                raise UnsupportedModelError(f"{type(m).__name__} gates were added by hand; extract handles models "
                                            "gated with attach_gates only")
            g = hard[m._segment]
            g = g.repeat(m._repeat) if m._repeat > 1 else g
            if m._block >= 0:
                g = g * hard[m._block]
            fold_in_place(m, g)
    remove_bank(small)
    if hasattr(small_bank, "surgery"):
        del small_bank.surgery
    block_specs = [b.to_spec(b.name in closed) for b in record.blocks]
    close_blocks(small, block_specs)

    gone = [b for b in record.blocks if b.name in closed]
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
    _remove_channels(small, spec_groups, _random_inputs(record, device))
    small.train(model.training)
    small.polarprune_spec = _spec(small, record, spec_groups, block_specs)
    if verify:
        _verify(model, small, inputs)
    return small


def _surviving_root(rec: GroupRecord, gone: list[BlockRecord]) -> str:
    """A layer producing the group's channels that is still in the model after the closed blocks went."""
    removed = {n for b in gone for n in b.branch}
    for name in [rec.root, *rec.producers]:
        if name not in removed:
            return name
    raise UnsupportedModelError(f"every layer producing the channels of group {rec.name!r} is inside a removed "
                                "block, yet the group reaches outside it")


def _remove_channels(model: nn.Module, groups: list[dict], inputs) -> None:
    """Remove every channel a group does not keep, with Torch-Pruning's group pruning (in place)."""
    graph = _build_graph(model, inputs)
    depthwise_out = _tp().pruner.function.prune_depthwise_conv_out_channels
    for group in groups:
        keep = set(group["kept"])
        drop = [i for i in range(group["channels"]) if i not in keep]
        if drop and "removed_with" not in group:
            root = model.get_submodule(group["root"])
            depthwise = isinstance(root, nn.Conv2d) and root.groups == root.out_channels > 1
            fn = depthwise_out if depthwise else graph.get_pruner_of_module(root).prune_out_channels
            graph.get_pruning_group(root, fn, drop).prune()


def _verify(gated: nn.Module, small: nn.Module, inputs) -> None:
    modes = (gated.training, small.training)
    try:
        gated.eval()
        small.eval()
        with torch.no_grad():
            ref, out = gated(*inputs), small(*inputs)
    finally:
        gated.train(modes[0])
        small.train(modes[1])
    ref_flat, out_flat = _flatten(ref), _flatten(out)
    for a, b in zip(ref_flat, out_flat):
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


def _flatten(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten(v)]
    return []


# ----------------------------------------------------------------------------- save / load

def _spec(model: nn.Module, record: SurgeryRecord, groups: list[dict], blocks: list[dict]) -> dict:
    from . import __version__

    return {
        "format": SPEC_FORMAT,
        "library": "polarprune_cuda",
        "version": __version__,
        "torch": torch.__version__,
        "input_shapes": record.input_shapes,
        "input_dtypes": record.input_dtypes,
        "groups": groups,
        "blocks": blocks,
        "removed_blocks": [b["name"] for b in blocks if b["closed"]],
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
    }


def save_pruned(model: nn.Module, path) -> Path:
    """Write ``path/spec.json`` (human-readable channel spec) and ``path/weights.pt`` (state_dict)."""
    _check_model(model)
    spec = getattr(model, "polarprune_spec", None)
    if not isinstance(spec, dict):
        raise ValueError("model has no channel spec: save the model returned by pp.extract")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path / WEIGHTS_FILE, lambda tmp: torch.save(state, tmp))
    text = json.dumps(spec, indent=1)
    atomic_write(path / SPEC_FILE, lambda tmp: Path(tmp).write_text(text))
    return path


def load_pruned(path, factory: Callable[[], nn.Module], map_location="cpu") -> nn.Module:
    """Rebuild a pruned model: ``factory()`` makes the user's dense model, the spec prunes it, weights load.

    Raises ValueError naming the first module that does not match the spec.
    """
    path = Path(path)
    spec_file, weights_file = path / SPEC_FILE, path / WEIGHTS_FILE
    for f in (spec_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: path must be a folder written by save_pruned")
    if not callable(factory):
        raise TypeError(f"factory must be a callable returning the dense model, got {type(factory).__name__}")
    try:
        spec = json.loads(spec_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{spec_file} is not valid JSON: {exc}") from exc
    if spec.get("library") != "polarprune_cuda" or spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"{spec_file} is not a polarprune_cuda channel spec of format {SPEC_FORMAT}")
    model = factory()
    _check_model(model)
    device = _model_device(model)
    blocks = spec.get("blocks", [])
    if not isinstance(blocks, list) or not all(isinstance(b, dict) and isinstance(b.get("name"), str)
                                               for b in blocks):
        raise ValueError(f"{spec_file}: 'blocks' must be a list of {{name, closed, shortcut, act}} entries")
    close_blocks(model, blocks)
    for group in spec["groups"]:
        if "removed_with" in group:
            continue
        try:
            root = model.get_submodule(group["root"])
        except AttributeError:
            raise ValueError(f"spec does not match the model: module {group['root']!r} of the spec is not in the "
                             "model") from None
        channels = root.weight.shape[0] if hasattr(root, "weight") else None
        if channels != group["channels"]:
            raise ValueError(f"spec does not match the model: module {group['root']!r} has {channels} output "
                             f"channels, the spec says {group['channels']}")
    record = SurgeryRecord([], spec["input_shapes"], spec["input_dtypes"], 1, None, {})
    _remove_channels(model, spec["groups"], _random_inputs(record, device))
    state_shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    for key, shape in state_shapes.items():      # in the model's own order
        module = key.rpartition(".")[0] or key
        if key not in spec["shapes"]:
            raise ValueError(f"spec does not match the model: {module!r} has {key!r}, which the spec does not list")
        if spec["shapes"][key] != shape:
            raise ValueError(f"spec does not match the model: {module!r} has {key} of shape {shape}, "
                             f"the spec says {spec['shapes'][key]}")
    missing = [k for k in spec["shapes"] if k not in state_shapes]
    if missing:
        raise ValueError(f"spec does not match the model: {missing[0].rpartition('.')[0]!r} of the spec is "
                         f"not in the model (no {missing[0]!r})")
    state = torch.load(weights_file, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    model.polarprune_spec = spec
    return model


__all__ = [
    "UnsupportedModelError",
    "attach_gates",
    "count",
    "extract",
    "kept_channels",
    "load_pruned",
    "predicted_count",
    "predicted_depth",
    "removed_blocks",
    "save_pruned",
]
