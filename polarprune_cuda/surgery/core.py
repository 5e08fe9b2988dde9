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
  and reads the weights with ``torch.load(weights_only=True)``. The spec
  carries its own digest (field ``sha256``: SHA-256 of ``json.dumps`` of the
  other fields with ``sort_keys=True``), the weights a ``weights.pt.sha256``
  file; both are verified, and the spec passes a schema check (types, ranges,
  an allow-list of dtypes, at most ``MAX_INPUT_ELEMENTS`` elements per traced
  input) before anything in it is used.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .._io import IntegrityError, load_tensors, save_tensors, write_text
from .blocks import BlockRecord, close_blocks, depth, prepare_blocks
from ..ops.cost import CostModel
from ..gates.modules import (
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
from ..errors import UnsupportedModelError

SPEC_FORMAT = 1
SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.pt"




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

# dtypes an input may have (the spec names them by these strings; nothing else is looked up on torch)
INPUT_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "complex64": torch.complex64, "complex128": torch.complex128, "int8": torch.int8, "int16": torch.int16,
    "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool,
}
MAX_INPUT_ELEMENTS = 2 ** 24      # elements of one input that load_pruned allocates to trace the model
MAX_INPUTS = 16                   # inputs a spec may list
MAX_SPEC_BYTES = 64 * 2 ** 20     # size of a spec.json that load_pruned reads


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _as_inputs(example_inputs) -> tuple[Tensor, ...]:
    """``example_inputs`` as a tuple of tensors, each non-empty (batch >= 1), of a supported dtype, finite."""
    if isinstance(example_inputs, Tensor):
        inputs = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)) and example_inputs and all(isinstance(t, Tensor)
                                                                              for t in example_inputs):
        inputs = tuple(example_inputs)
    else:
        raise TypeError("example_inputs must be a tensor (or a tuple of tensors) shaped like one batch of model "
                        f"input, e.g. torch.randn(1, 3, 224, 224); got {type(example_inputs).__name__}")
    for t in inputs:
        if t.dim() == 0 or t.numel() == 0:
            raise ValueError(f"example_inputs must be one batch of at least one sample, e.g. torch.randn(1, 3, 224, "
                             f"224); got a tensor of shape {tuple(t.shape)}")
        if _dtype_name(t.dtype) not in INPUT_DTYPES:
            raise ValueError(f"example_inputs have dtype {t.dtype}, which is not supported; use one of "
                             f"{', '.join(INPUT_DTYPES)}")
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"example_inputs hold NaN or inf (a tensor of shape {tuple(t.shape)})")
    return inputs


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def _check_guard_args(min_channels, round_to, none_means: str | None = None) -> None:
    """Validate ``min_channels`` and ``round_to`` (the one place for attach_gates, extract, kept_channels and
    predicted_count). With ``none_means``, None is allowed for both and means that."""
    if not (none_means is not None and min_channels is None):
        if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
            alt = f"None ({none_means}) or " if none_means else ""
            raise ValueError(f"min_channels must be {alt}an int >= 1, got {min_channels!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        alt = f" ({none_means})" if none_means else ""
        raise ValueError(f"round_to must be None{alt} or an int >= 1, got {round_to!r}")


def _check_finite_model(model: nn.Module) -> None:
    """ValueError naming the first floating parameter or buffer (gate scores aside) that holds NaN or inf."""
    bank = find_bank(model)
    skip = {id(bank.scores)} if bank is not None else set()
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if id(t) in skip or not (t.is_floating_point() or t.is_complex()):
                continue
            if not bool(torch.isfinite(t.detach()).all()):
                raise ValueError(f"model {kind} {name!r} holds NaN or inf; extraction needs finite weights and "
                                 "BatchNorm statistics (check the training run, e.g. its learning rate)")


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _random_inputs(record: SurgeryRecord, device) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for shape, dtype in zip(record.input_shapes, record.input_dtypes):
        dt = INPUT_DTYPES.get(dtype) if isinstance(dtype, str) else None
        if dt is None:
            raise ValueError(f"input_dtypes: {dtype!r} is not one of {', '.join(INPUT_DTYPES)}")
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise ValueError(f"input_shapes: {shape} has more than {MAX_INPUT_ELEMENTS} elements")
        if dt.is_floating_point or dt.is_complex:
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


def _run_on(model: nn.Module, inputs):
    """``model(*inputs)``; any error of the user's forward becomes ValueError naming example_inputs."""
    try:
        return model(*inputs)
    except Exception as exc:
        shapes = ", ".join(f"{tuple(t.shape)} {_dtype_name(t.dtype)}" for t in inputs)
        raise ValueError(f"example_inputs do not fit the model: {type(exc).__name__}: {exc} (example_inputs: "
                         f"{shapes})") from exc


def _check_fits(model: nn.Module, inputs) -> None:
    """Run ``model`` once in eval mode on ``inputs`` (ValueError if it cannot); training mode is restored."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            _run_on(model, inputs)
    finally:
        model.train(was_training)


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
            _run_on(model, inputs)
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
        ignored_layers: a list of modules (or of their names) whose output channels stay ungated;
            a single string is refused (TypeError), pass ``["name"]``.
            The classifier (any layer whose outputs reach the model output) is never gated.
        min_channels: :func:`extract` never lets a group drop below this many channels.
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

    The gate scores live in ``model.polarprune_bank`` (block gates are segments
    of one gate, after the channel segments); the cost models ``channels``,
    ``params`` and ``macs`` are registered on it for
    :class:`~polarprune_cuda.PolarizationLoss`. A block gate costs what its
    branch costs, and channel gates inside a closed branch stop counting. State-
    dict keys of the original parameters do not change.
    """
    _check_model(model)
    inputs = _as_inputs(example_inputs)
    _check_guard_args(min_channels, round_to)
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
    if ignored_layers is not None and (
            isinstance(ignored_layers, (str, bytes)) or not isinstance(ignored_layers, Iterable)
            or (isinstance(ignored_layers, nn.Module) and not isinstance(ignored_layers, nn.ModuleList))):
        raise TypeError("ignored_layers must be a list of modules or module names, got "
                        f"{type(ignored_layers).__name__} (e.g. ignored_layers=['layer3.0.conv1'])")
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
    spatial = _io_shapes(model, inputs)  # runs the model once: example_inputs that do not fit raise here

    block_records = prepare_blocks(model, names, inputs, blocks) if blocks is not False else []
    if blocks is not False and not block_records:
        raise UnsupportedModelError("blocks=True, but the model has no residual block that can be block-gated "
                                    "(see polarprune_cuda.surgery.blocks for what a block must look like)")
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
    _check_guard_args(min_channels, round_to, none_means="the value given to attach_gates")
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

    A block whose gate is closed becomes a :class:`~polarprune_cuda.surgery.blocks.ClosedBlock`,
    ``act(shortcut(x))``: the model gets shallower. ``min_channels``/``round_to``
    override the values given to attach_gates. With ``verify`` (default) the
    eval-mode outputs of the gated and the extracted model are compared on
    ``example_inputs`` (default: a seeded random batch shaped like
    attach_gates' example) and a mismatch raises. The gated model is not changed.
    Refused up front: ``example_inputs`` the model cannot run on, and NaN or inf in any
    parameter or buffer of the model (ValueError naming it).
    """
    bank, record = _surgery(model)
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True or False, got {verify!r}")
    masks = kept_channels(model, min_channels, round_to)
    _check_finite_model(model)
    device = _model_device(model)
    if example_inputs is None:
        inputs = _random_inputs(record, device)
    else:
        inputs = _as_inputs(example_inputs)
        _check_fits(model, inputs)
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

def _spec_input_shapes(shapes: list[list[int]]) -> list[list[int]]:
    """The input shapes a spec records: the example's, with the batch made smaller where an input has more
    than MAX_INPUT_ELEMENTS elements (load_pruned traces the model on inputs of these shapes)."""
    shapes = [[int(d) for d in s] for s in shapes]
    if all(math.prod(s) <= MAX_INPUT_ELEMENTS for s in shapes):
        return shapes
    batch = min(MAX_INPUT_ELEMENTS // max(1, math.prod(s[1:])) for s in shapes)
    return [[max(1, min(s[0], batch)), *s[1:]] for s in shapes]


def _spec(model: nn.Module, record: SurgeryRecord, groups: list[dict], blocks: list[dict]) -> dict:
    from .._version import __version__

    return {
        "format": SPEC_FORMAT,
        "library": "polarprune_cuda",
        "version": __version__,
        "torch": torch.__version__,
        "input_shapes": _spec_input_shapes(record.input_shapes),
        "input_dtypes": record.input_dtypes,
        "groups": groups,
        "blocks": blocks,
        "removed_blocks": [b["name"] for b in blocks if b["closed"]],
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
    }


def spec_digest(spec: dict) -> str:
    """SHA-256 of ``json.dumps(spec without its 'sha256' field, sort_keys=True)``: the spec's self-digest."""
    body = {k: v for k, v in spec.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


# --- the spec's schema: checked before anything in it is used

SPEC_FIELDS = ("format", "library", "version", "torch", "input_shapes", "input_dtypes", "groups", "blocks",
               "removed_blocks", "shapes")
GROUP_FIELDS = ("name", "root", "channels", "repeat", "kept")
BLOCK_FIELDS = ("name", "closed", "shortcut", "act", "depth_saved")
MAX_INPUT_DIMS = 8
_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_ATTR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, (set, tuple)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Schema:
    """Field checks that raise ValueError naming the file and the field (e.g. ``groups[3].kept``)."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, expected: str, value=None, show: bool = True):
        got = f", got {_show(value)}" if show else ""
        raise ValueError(f"{self.where}: field '{field}' must be {expected}{got}")

    def fields(self, obj, field: str, required, optional=()) -> dict:
        if not isinstance(obj, dict):
            self.fail(field or "(top level)", "a JSON object", obj)
        prefix = f"{field}." if field else ""
        for key in required:
            if key not in obj:
                raise ValueError(f"{self.where}: field '{prefix}{key}' is missing (required: {', '.join(required)})")
        extra = [k for k in obj if k not in required and k not in optional]
        if extra:
            raise ValueError(f"{self.where}: unknown field '{prefix}{extra[0]}' (fields: "
                             f"{', '.join((*required, *optional))})")
        return obj

    def int_(self, value, field: str, low: int, high: int | None = None) -> int:
        if type(value) is not int or value < low or (high is not None and value > high):
            rng = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
            self.fail(field, rng, value)
        return value

    def str_(self, value, field: str, pattern: re.Pattern | None = None, what: str = "a string") -> str:
        if not isinstance(value, str) or len(value) > 1000 or (pattern is not None and not pattern.fullmatch(value)):
            self.fail(field, what, value)
        return value

    def list_(self, value, field: str, low: int = 0, high: int | None = None) -> list:
        if not isinstance(value, list) or len(value) < low or (high is not None and len(value) > high):
            n = f" of {low} to {high} entries" if high is not None else (f" of at least {low} entries" if low else "")
            self.fail(field, f"a list{n}", value)
        return value


def _check_spec(spec, where: str) -> dict:
    """Validate a parsed channel spec (without its 'sha256' field); ValueError naming the field."""
    s = _Schema(where)
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must hold a JSON object (a polarprune_cuda channel spec), got a JSON "
                         f"{'array' if isinstance(spec, list) else type(spec).__name__}")
    s.fields(spec, "", SPEC_FIELDS)
    if spec["library"] != "polarprune_cuda" or type(spec["format"]) is not int or spec["format"] != SPEC_FORMAT:
        raise ValueError(f"{where} is not a polarprune_cuda channel spec of format {SPEC_FORMAT} (fields 'library' "
                         f"{_show(spec['library'])}, 'format' {_show(spec['format'])})")
    s.str_(spec["version"], "version")
    s.str_(spec["torch"], "torch")

    shapes_in = s.list_(spec["input_shapes"], "input_shapes", 1, MAX_INPUTS)
    for i, shape in enumerate(shapes_in):
        s.list_(shape, f"input_shapes[{i}]", 1, MAX_INPUT_DIMS)
        for j, d in enumerate(shape):
            s.int_(d, f"input_shapes[{i}][{j}]", 1, MAX_INPUT_ELEMENTS)
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            s.fail(f"input_shapes[{i}]", f"a shape of at most {MAX_INPUT_ELEMENTS} elements (load_pruned "
                   f"allocates an input of that shape), got {shape} ({math.prod(shape)} elements)", show=False)
    dtypes = s.list_(spec["input_dtypes"], "input_dtypes", len(shapes_in), len(shapes_in))
    for i, d in enumerate(dtypes):
        if not isinstance(d, str) or d not in INPUT_DTYPES:
            s.fail(f"input_dtypes[{i}]", f"one of {', '.join(INPUT_DTYPES)}", d)

    blocks = s.list_(spec["blocks"], "blocks")
    seen_blocks: dict[str, bool] = {}
    for i, b in enumerate(blocks):
        f = f"blocks[{i}]"
        s.fields(b, f, BLOCK_FIELDS)
        name = s.str_(b["name"], f"{f}.name", _NAME, "a module name such as 'layer1.0'")
        if name in seen_blocks:
            s.fail(f"{f}.name", "a block not listed before", name)
        if not isinstance(b["closed"], bool):
            s.fail(f"{f}.closed", "true or false", b["closed"])
        for key in ("shortcut", "act"):
            if b[key] is not None:
                s.str_(b[key], f"{f}.{key}", _ATTR, "null or an attribute name")
        s.int_(b["depth_saved"], f"{f}.depth_saved", 0)
        seen_blocks[name] = b["closed"]
    removed = s.list_(spec["removed_blocks"], "removed_blocks")
    closed = [n for n, c in seen_blocks.items() if c]
    if removed != closed:
        s.fail("removed_blocks", f"the names of the closed blocks, {_show(closed)}", removed)

    for i, g in enumerate(s.list_(spec["groups"], "groups")):
        f = f"groups[{i}]"
        s.fields(g, f, GROUP_FIELDS, ("removed_with",))
        s.str_(g["name"], f"{f}.name")
        s.str_(g["root"], f"{f}.root", _NAME, "a module name such as 'layer1.0.conv1'")
        channels = s.int_(g["channels"], f"{f}.channels", 1)
        repeat = s.int_(g["repeat"], f"{f}.repeat", 1, channels)
        if channels % repeat:
            s.fail(f"{f}.repeat", f"a divisor of channels ({channels})", repeat)
        kept = s.list_(g["kept"], f"{f}.kept")
        if "removed_with" in g:
            owner = g["removed_with"]
            if not isinstance(owner, str) or not seen_blocks.get(owner, False):
                s.fail(f"{f}.removed_with", "the name of a closed block of 'blocks'", owner)
            if kept:
                s.fail(f"{f}.kept", "empty for a group removed with its block", kept)
            continue
        if not kept:
            s.fail(f"{f}.kept", "a non-empty list of channel indices (a group keeps a channel unless it has "
                   "'removed_with')", kept)
        previous = -1
        for j, k in enumerate(kept):
            s.int_(k, f"{f}.kept[{j}]", 0, channels - 1)
            if k <= previous:
                s.fail(f"{f}.kept", "sorted channel indices without repeats", kept)
            previous = k
        size = channels // repeat
        if repeat > 1 and kept != [k + r * size for r in range(repeat) for k in kept if k < size]:
            s.fail(f"{f}.kept", f"the same channels in each of its {repeat} groups of {size}", kept)

    shapes = spec["shapes"]
    if not isinstance(shapes, dict):
        s.fail("shapes", "a JSON object of state_dict key -> shape", shapes)
    for key, shape in shapes.items():
        s.list_(shape, f"shapes.{key}")
        for j, d in enumerate(shape):
            s.int_(d, f"shapes.{key}[{j}]", 0)
    return spec


def save_pruned(model: nn.Module, path) -> Path:
    """Write ``path/spec.json`` (human-readable channel spec with its own ``sha256`` field), ``path/weights.pt``
    (state_dict) and ``path/weights.pt.sha256`` (its digest, ``sha256sum -c`` format)."""
    _check_model(model)
    spec = getattr(model, "polarprune_spec", None)
    if not isinstance(spec, dict):
        raise ValueError("model has no channel spec: save the model returned by pp.extract")
    spec = json.loads(json.dumps({k: v for k, v in spec.items() if k != "sha256"}))   # plain JSON values
    _check_spec(spec, "model.polarprune_spec")   # never write a spec that load_pruned refuses
    spec["sha256"] = spec_digest(spec)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_tensors(state, path / WEIGHTS_FILE)
    write_text(path / SPEC_FILE, json.dumps(spec, indent=1))
    return path


def _read_spec(spec_file: Path, verify: bool) -> dict:
    """The parsed, digest-checked (with ``verify``) and schema-checked spec, without its 'sha256' field."""
    size = spec_file.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise ValueError(f"{spec_file} has {size} bytes, more than a channel spec has ({MAX_SPEC_BYTES} at most)")
    try:
        spec = json.loads(spec_file.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{spec_file} is not valid JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(spec, dict):
        _check_spec(spec, str(spec_file))   # raises: not a JSON object
    if verify:
        recorded = spec.get("sha256")
        if recorded is None:
            raise IntegrityError(f"{spec_file} has no 'sha256' field, so its contents cannot be verified (it was "
                                 "written by an older polarprune_cuda, or edited); pass verify=False to load it "
                                 "anyway")
        if not isinstance(recorded, str) or recorded != spec_digest(spec):
            raise IntegrityError(f"{spec_file} was changed or damaged after it was written (its contents do not "
                                 "match its 'sha256' field); restore it or save the model again, or pass "
                                 "verify=False to skip the check")
    spec.pop("sha256", None)
    return _check_spec(spec, str(spec_file))


def _check_factory(factory) -> None:
    if isinstance(factory, nn.Module):
        raise TypeError(f"factory must be a callable that returns a new dense model, e.g. lambda: MyNet(), not a "
                        f"model instance (got a {type(factory).__name__} instance)")
    if not callable(factory):
        raise TypeError(f"factory must be a callable that returns the dense model, e.g. lambda: MyNet(); got "
                        f"{type(factory).__name__}")


def _rebuild(model: nn.Module, spec: dict) -> None:
    """Apply a schema-checked spec to the dense ``model`` in place; ValueError 'spec does not match the model'."""
    device = _model_device(model)
    close_blocks(model, spec["blocks"], strict=True)
    for group in spec["groups"]:
        if "removed_with" in group:
            continue
        try:
            root = model.get_submodule(group["root"])
        except Exception:
            raise ValueError(f"spec does not match the model: module {group['root']!r} of the spec is not in the "
                             "model") from None
        weight = getattr(root, "weight", None)
        channels = weight.shape[0] if isinstance(weight, Tensor) and weight.dim() > 0 else None
        if channels != group["channels"]:
            raise ValueError(f"spec does not match the model: module {group['root']!r} has {channels} output "
                             f"channels, the spec says {group['channels']}")
    record = SurgeryRecord([], spec["input_shapes"], spec["input_dtypes"], 1, None, {})
    inputs = _random_inputs(record, device)
    try:
        _check_fits(model, inputs)
    except ValueError as exc:
        raise ValueError(f"spec does not match the model: it cannot run on inputs of the spec's input_shapes "
                         f"{spec['input_shapes']} and input_dtypes {spec['input_dtypes']} "
                         f"({exc.__cause__.__class__.__name__}: {exc.__cause__})") from exc
    try:
        _remove_channels(model, spec["groups"], inputs)
    except Exception as exc:
        raise ValueError(f"spec does not match the model: removing the spec's channels failed "
                         f"({type(exc).__name__}: {exc})") from exc
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
    try:
        _check_fits(model, inputs)
    except ValueError as exc:
        raise ValueError(f"spec does not match the model: the model with the spec's channels removed cannot run "
                         f"({exc.__cause__.__class__.__name__}: {exc.__cause__})") from exc


def load_pruned(path, factory: Callable[[], nn.Module], map_location="cpu", verify: bool = True) -> nn.Module:
    """Rebuild a pruned model: ``factory()`` makes the user's dense model, the spec prunes it, weights load.

    ``factory`` is a callable that returns a new dense model (``lambda: MyNet()``), not a model. The spec is
    checked against its ``sha256`` field and a schema, the weights against ``weights.pt.sha256``, before
    anything in them is used, and the weights load with ``torch.load(weights_only=True)``. ``verify=False``
    skips both digests (files written elsewhere or by an older version); the schema and the shape checks
    stay. Raises :class:`~polarprune_cuda._io.IntegrityError` (a ValueError naming the file) for a changed
    file, ValueError naming the field for a malformed spec, and ValueError naming the first module that does
    not match the spec.
    """
    path = Path(path)
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True or False, got {verify!r}")
    spec_file, weights_file = path / SPEC_FILE, path / WEIGHTS_FILE
    for f in (spec_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: path must be a folder written by save_pruned")
    _check_factory(factory)
    spec = _read_spec(spec_file, verify)
    state = load_tensors(weights_file, map_location=map_location, verify=verify)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{weights_file} does not hold a state_dict (a dict of names to tensors)")
    for key, shape in spec["shapes"].items():
        if key not in state or list(state[key].shape) != shape:
            got = "no such entry" if key not in state else f"shape {list(state[key].shape)}"
            raise ValueError(f"{weights_file} does not match {spec_file.name}: the spec lists {key!r} of shape "
                             f"{shape}, the weights have {got}")
    extra = [k for k in state if k not in spec["shapes"]]
    if extra:
        raise ValueError(f"{weights_file} does not match {spec_file.name}: {extra[0]!r} is not in the spec")
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"factory must return an nn.Module (the dense model), got {type(model).__name__}")
    _rebuild(model, spec)
    model.load_state_dict(state)   # keys and shapes equal the model's: checked above
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
    "spec_digest",
]
