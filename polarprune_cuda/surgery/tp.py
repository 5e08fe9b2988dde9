"""The one Torch-Pruning adapter: everything in surgery/ that calls ``torch_pruning`` is here.

* :func:`_build_graph`: Torch-Pruning's ``DependencyGraph`` of a model (tracing errors become
  :class:`~polarprune_cuda.errors.UnsupportedModelError`).
* :func:`channel_plans`: the coupled channel groups that can be gated, as :class:`_Plan` s (which
  modules are BatchNorms, producers, consumers of the group; which producers are gated through
  their weights), in module order.
* :func:`_remove_channels`: physical channel removal with Torch-Pruning's group pruning.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..gates.modules import GATED_CLASS
from .inputs import eval_mode


def _tp():
    import torch_pruning as tp

    return tp


def _build_graph(model: nn.Module, inputs: tuple[Tensor, ...]):
    """Torch-Pruning's dependency graph of ``model``; training mode and grad mode are restored."""
    tp = _tp()
    try:
        with eval_mode(model, switch=False), torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)
    except Exception as exc:  # tracing runs the user's forward
        raise UnsupportedModelError(f"Torch-Pruning could not trace the model on example_inputs: "
                                    f"{type(exc).__name__}: {exc}") from exc
    return graph


def _output_layers(graph) -> list[nn.Module]:
    """Conv/Linear layers whose outputs reach the model output through shape-preserving ops only."""
    T = _tp().ops.OPTYPE
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
        self.root_module = group[0].dep.target.module
        self.root = names[self.root_module]
        self.channels = len(group[0].idxs)
        self.bns: list[nn.Module] = []
        self.producers: list[nn.Module] = []
        self.inputs: list[tuple[nn.Module, list[int], list[int]]] = []   # (module, idxs, root_idxs)
        self.outputs: list[tuple[nn.Module, list[int], list[int]]] = []
        self.repeat = 1
        for item in group:
            self._add(graph, item, names)
        if self.channels % self.repeat:
            raise UnsupportedModelError(f"group {self.root!r} has {self.channels} channels, not a multiple of the "
                                        f"grouped convolutions' {self.repeat} groups")
        self.weight_gated = self._weight_gated(graph, names)

    def _add(self, graph, item, names) -> None:
        """Give the module of one group member its role (BatchNorm, producer or consumer), or refuse it."""
        T = _tp().ops.OPTYPE
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
        elif node.type not in (T.ELEMENTWISE, T.RESHAPE, T.CONCAT, T.SPLIT, T.SLICE, T.UNBIND, T.EXPAND, T.OUTPUT):
            raise UnsupportedModelError(
                f"{label} ({type(module).__name__}) is in the channel group of {self.root!r}; gates cannot be "
                f"folded through it. Add {self.root!r} to ignored_layers")

    def _weight_gated(self, graph, names) -> list[nn.Module]:
        """The producers with no BatchNorm right after them: their output-channel weights carry the gates."""
        found = []
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
            found.append(p)
        return found

    def _require_whole(self, module, label, idxs, root_idxs, channels) -> None:
        if len(idxs) != channels or idxs != root_idxs:
            raise UnsupportedModelError(
                f"{label} mixes channels of several groups (e.g. after a concatenation), which this version "
                f"cannot gate; add {self.root!r} to ignored_layers")


def channel_plans(model: nn.Module, inputs, names: dict[nn.Module, str], ignored: list[nn.Module]) -> list[_Plan]:
    """The gateable channel groups of ``model`` (not ``ignored``, not the classifier), in module order."""
    graph = _build_graph(model, inputs)
    outputs = _output_layers(graph)
    groups = list(graph.get_all_groups(ignored_layers=ignored + outputs, root_module_types=(nn.Conv2d, nn.Linear)))
    plans = [_Plan(graph, g, names) for g in groups]
    order = {n: i for i, n in enumerate(names.values())}
    return sorted((p for p in plans if p.bns or p.weight_gated), key=lambda p: order[p.root])


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
