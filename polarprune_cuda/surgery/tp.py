"""The one Torch-Pruning adapter: everything in surgery/ that calls ``torch_pruning`` is here.

* :func:`_build_graph`: Torch-Pruning's ``DependencyGraph`` of a model (tracing errors become
  :class:`~polarprune_cuda.errors.UnsupportedModelError`).
* :func:`channel_plans`: the coupled channel groups that can be gated, as :class:`Plan` s (which
  modules are BatchNorms, producers, consumers of the group; which producers are gated through
  their weights), in module order.
* :func:`remove_channels`: physical channel removal with Torch-Pruning's group pruning.
* :func:`_exact_splits`: every call into Torch-Pruning runs with :mod:`.tp_mappings`' exact split and
  concat index mappings and a revisit test that ends (:func:`_covered`).
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..gates.modules import GATED_CLASS
from . import tp_mappings
from .inputs import eval_mode

#: what attach_gates does with a channel group it cannot gate
ON_UNSUPPORTED = ("raise", "skip")


def _tp():
    import torch_pruning as tp

    return tp


def _build_graph(model: nn.Module, inputs: tuple[Tensor, ...]):
    """Torch-Pruning's dependency graph of ``model``; training mode and grad mode are restored."""
    tp = _tp()
    try:
        with eval_mode(model, switch=False), torch.enable_grad(), warnings.catch_warnings(), _exact_splits():
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)
    except Exception as exc:  # tracing runs the user's forward
        where = _trace_culprit(exc, model)
        raise UnsupportedModelError(f"Torch-Pruning could not trace the model on example_inputs: "
                                    f"{type(exc).__name__}: {exc}{where}") from exc
    return graph


def _trace_culprit(exc: BaseException, model: nn.Module) -> str:
    """Where in the model Torch-Pruning's tracing failed, in words: the op it was mapping (a reshape, split
    or concatenation, read from the failing frame) and the layer whose output it takes; '' if unknown."""
    names = {m: n for n, m in model.named_modules()}
    tb, found = exc.__traceback__, None
    while tb is not None:
        for key in ("reshape_node", "split_node", "cat_node", "slice_node"):
            found = tb.tb_frame.f_locals.get(key, found)
        tb = tb.tb_next
    if found is None:
        return ""
    kind = type(found.module).__name__.strip("_").replace("Op", "").lower() or "op"
    stack, seen = list(found.inputs), set()
    while stack:
        node = stack.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.module in names:
            return (f" (in its mapping of a {kind} of the output of {names[node.module]!r}: a channel shuffle or "
                    "a view that moves channels, which channel pruning cannot follow)")
        stack.extend(node.inputs)
    return f" (in its mapping of a {kind})"


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


class Plan:
    """Roles of the modules of one group (computed from a Torch-Pruning group)."""

    def __init__(self, graph, group, names: dict[nn.Module, str]):
        self.root_module = group[0].dep.target.module
        self.root = names[self.root_module]
        self.channels = len(group[0].idxs)
        self.bns: list[nn.Module] = []
        # modules with channels of several groups (a BatchNorm after a concatenation, a weight-gated producer
        # whose output is split): (module, its channel indices in this group, the group's indices of them)
        self.mixed: list[tuple[nn.Module, list[int], list[int]]] = []
        self.partial: dict[nn.Module, tuple[list[int], list[int]]] = {}   # producers of part of the channels
        self.producers: list[nn.Module] = []
        self.inputs: list[tuple[nn.Module, list[int], list[int]]] = []   # (module, idxs, root_idxs)
        self.outputs: list[tuple[nn.Module, list[int], list[int]]] = []
        self.repeat = 1
        for item in group:
            self._add(graph, item, names)
        if self.channels % self.repeat:
            raise UnsupportedModelError(f"group {self.root!r} has {self.channels} channels, not a multiple of the "
                                        f"grouped convolutions' {self.repeat} groups")
        self._require_one_gate_per_channel(names)
        self._require_untied(graph, names)
        self.weight_gated = self._weight_gated(graph, names)

    def _require_untied(self, graph, names) -> None:
        """Refuse a group whose channel 0 cannot be removed alone: Torch-Pruning's group for that one channel
        takes more than one channel (per grouped-convolution tile) of some BatchNorm or producer. That happens
        where a depthwise convolution ties the two halves of a concatenation (ghost modules), so that one
        gate per channel would not describe what extraction removes."""
        probe = graph.get_pruning_group(self.root_module, _out_fn(graph, self.root_module), [0])
        mine = {id(m) for m, _, _ in self.outputs}
        for item in probe:
            module = item.dep.target.module
            if id(module) in mine and len(item.idxs) > self.repeat:
                raise UnsupportedModelError(
                    f"removing one channel of group {self.root!r} removes {len(item.idxs)} channels of "
                    f"{names.get(module, type(module).__name__)} (a depthwise convolution across a concatenation "
                    f"ties them), which one gate per channel cannot express; add {self.root!r} to ignored_layers")

    def _require_one_gate_per_channel(self, names) -> None:
        """Refuse a group in which one channel of a module stands for several of the group's gates (a
        depthwise convolution that ties two halves of a concatenation, as in ghost modules): removing one
        of those gates' channels would remove the others' too."""
        size = self.channels // self.repeat
        for module, idxs, root_idxs in self.outputs + self.inputs:
            seen: dict[int, int] = {}
            for i, r in zip(idxs, root_idxs):
                if seen.setdefault(i, r % size) != r % size:
                    raise UnsupportedModelError(
                        f"{names.get(module, type(module).__name__)} ties channels {seen[i]} and {r % size} of "
                        f"group {self.root!r} together (e.g. a depthwise convolution across a concatenation), "
                        f"which one gate per channel cannot express; add {self.root!r} to ignored_layers")

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
            if not isinstance(module, nn.BatchNorm2d) or not module.affine:
                raise UnsupportedModelError(
                    f"{label} ({type(module).__name__}) is in the channel group of {self.root!r}, but only "
                    f"affine BatchNorm2d (or a subclass) can be gated; add {self.root!r} to ignored_layers")
            if _whole(idxs, root_idxs, module.num_features, self.channels):
                self.bns.append(module)
            else:   # after a concatenation: this group is a part of the norm's channels
                self.mixed.append((module, idxs, root_idxs))
            self.outputs.append((module, idxs, root_idxs))
        elif node.type in (T.CONV, T.LINEAR, T.DEPTHWISE_CONV):
            if isinstance(module, nn.Conv2d) and module.groups > 1 and node.type != T.DEPTHWISE_CONV:
                self.repeat = _lcm(self.repeat, module.groups)
            if node.type == T.DEPTHWISE_CONV or out_fn:
                if not _whole(idxs, root_idxs, module.weight.shape[0], self.channels):   # output split or sliced
                    self.partial[module] = (idxs, root_idxs)
                self.producers.append(module)
                self.outputs.append((module, idxs, root_idxs))
            else:
                self.inputs.append((module, idxs, root_idxs))
        elif node.type == T.SPLIT and not tp_mappings.split_can_shrink(node.grad_fn, idxs):
            raise UnsupportedModelError(
                f"channels of group {self.root!r} pass a torch.split whose sizes are fixed in the model's code "
                f"(not its last part), so they cannot be removed; add {self.root!r} to ignored_layers")
        elif node.type == T.RESHAPE and not _reshape_keeps_channels(node):
            raise UnsupportedModelError(
                f"a reshape or view in the channel path of {self.root!r} splits or moves its channels (into heads, "
                "or a channel shuffle), which extraction cannot follow; add "
                f"{self.root!r} to ignored_layers")
        elif node.type not in (T.ELEMENTWISE, T.RESHAPE, T.CONCAT, T.SPLIT, T.SLICE, T.UNBIND, T.EXPAND, T.OUTPUT):
            raise UnsupportedModelError(
                f"{label} ({type(module).__name__}) is in the channel group of {self.root!r}; gates cannot be "
                f"folded through it. Add {self.root!r} to ignored_layers")

    def _weight_gated(self, graph, names) -> list[nn.Module]:
        """The producers with no BatchNorm right after them: their output-channel weights carry the gates
        (a producer of part of the channels, through a per-channel index, in ``mixed``)."""
        found = []
        bn_nodes = {graph.module2node[b] for b in self.bns + [m for m, _, _ in self.mixed]}
        for p in self.producers:
            nxt = graph.module2node[p].outputs
            if len(nxt) == 1 and nxt[0] in bn_nodes:
                continue
            if type(p) not in GATED_CLASS:   # a Conv2d subclass may use its weight otherwise (standardised...)
                raise UnsupportedModelError(
                    f"{names[p]} ({type(p).__name__}) produces channels of group {self.root!r} with no BatchNorm "
                    f"after it, and only plain nn.Conv2d/nn.Linear can be gated through their weights; add "
                    f"{self.root!r} to ignored_layers")
            if p in self.partial:
                self.mixed.append((p, *self.partial[p]))
            else:
                found.append(p)
        return found


def _out_fn(graph, root: nn.Module):
    """Torch-Pruning's function that removes output channels of ``root``."""
    if isinstance(root, nn.Conv2d) and root.groups == root.out_channels > 1:
        return _tp().pruner.function.prune_depthwise_conv_out_channels
    return graph.get_pruner_of_module(root).prune_out_channels


def _whole(idxs: list[int], root_idxs: list[int], module_channels: int, group_channels: int) -> bool:
    """Whether a module's channels are exactly the group's, in the group's order."""
    return module_channels == group_channels == len(idxs) and idxs == root_idxs == list(range(group_channels))


def _covered(group, dep, idxs) -> bool:
    """Torch-Pruning's ``Group.has_pruning_op``, by content: whether every (channel, root channel) of ``idxs``
    is already in the group for this target and handler.

    Its own test asks for the same list, in the same order; where propagation reaches a layer again with
    the same channels in another order or a part of them (rexnet's channel-padded residuals), the walk
    goes round again, for longer than any user waits (over 10 minutes at 64x64 for rexnet_100). The
    mappings act channel by channel, so a covered set propagates nothing new: skipping it is exact, and
    each step of the walk now adds at least one new channel, so the walk ends.
    """
    items = group._group
    if _DEADLINE and (time.monotonic() > _DEADLINE[0] or len(items) > _DEADLINE[1]):
        raise _GroupingTimeout(dep.target)
    cache = group.__dict__.setdefault("_pp_seen", [0, {}])   # items read so far, (target, handler) -> channels
    for other, other_idxs in items[cache[0]:]:
        cache[1].setdefault((id(other.target), id(other.handler)), set()).update(other_idxs)
    cache[0] = len(items)
    return set(idxs) <= cache[1].get((id(dep.target), id(dep.handler)), set())


class _GroupingTimeout(Exception):
    """Torch-Pruning's grouping ran past the deadline (raised from inside its walk)."""

    def __init__(self, node):
        super().__init__(getattr(node, "name", str(node)))
        self.node = node


#: seconds attach_gates gives Torch-Pruning to find the channel groups of a model
GROUPING_SECONDS = 60.0
#: a group walk longer than this many steps per node of the graph is stopped at once: ordinary groups take
#: about one step per node they reach; rexnet_100's passed 600,000 steps over 300 nodes and went on
GROUPING_STEPS_PER_NODE = 100
_DEADLINE: list[float] = []   # [monotonic deadline, largest group walk] while attach_gates groups


_ORIGINAL: dict = {}


@contextmanager
def _exact_splits():
    """Run Torch-Pruning with :mod:`.tp_mappings`' split and concat index mappings and :func:`_covered` in
    place of its own mappings and revisit test (restored afterwards, also on error)."""
    tp = _tp()
    mapping, group = tp.dependency.index_mapping, tp.dependency.group.Group
    _ORIGINAL.setdefault("has_pruning_op", group.has_pruning_op)
    tp_mappings.ORIGINAL.setdefault("split", mapping.update_split_index_mapping)
    tp_mappings.ORIGINAL.setdefault("concat", mapping.update_concat_index_mapping)
    mapping.update_split_index_mapping = tp_mappings.update_split_index_mapping
    mapping.update_concat_index_mapping = tp_mappings.update_concat_index_mapping
    group.has_pruning_op = _covered
    try:
        yield
    finally:
        mapping.update_split_index_mapping = tp_mappings.ORIGINAL["split"]
        mapping.update_concat_index_mapping = tp_mappings.ORIGINAL["concat"]
        group.has_pruning_op = _ORIGINAL["has_pruning_op"]


def _reshape_keeps_channels(node) -> bool:
    """True for the reshapes Torch-Pruning maps exactly: a flatten of (N, C, H, W) to (N, C*H*W) (or of
    (N, C, 1, 1) to (N, C)). A view that splits channels into heads or shuffles them is not one."""
    size = getattr(node.grad_fn, "_saved_self_sym_sizes", None) or getattr(node.grad_fn, "_saved_self_sizes", None)
    if size is None or len(size) != 4:
        return False
    if int(size[2]) * int(size[3]) == 1:
        return True
    mappings = [m for dep in node.dependencies for m in dep.index_mapping]
    return any(type(m).__name__ == "_FlattenIndexMapping" for m in mappings)


@dataclass
class Refusal:
    """A channel group attach_gates cannot gate: the layer that roots it and why."""

    root: str
    reason: str

    def __str__(self) -> str:
        return f"{self.root}: {self.reason}"


def _all_groups(graph, ignored: list[nn.Module], names: dict[nn.Module, str]) -> list:
    """Torch-Pruning's channel groups rooted at every Conv2d and Linear, with a progress bar after 3 seconds
    and an UnsupportedModelError naming where it was after :data:`GROUPING_SECONDS`."""
    total = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in graph.module2node)
    bar = _progress(total)
    groups = []
    started = time.monotonic()
    _DEADLINE[:] = [time.monotonic() + GROUPING_SECONDS, GROUPING_STEPS_PER_NODE * len(graph.module2node) + 1000]
    try:
        with _exact_splits():
            for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
                groups.append(group)
                bar.update(1)
    except _GroupingTimeout as exc:
        module = getattr(exc.node, "module", None)
        where = names.get(module, getattr(exc.node, "name", "?"))
        raise UnsupportedModelError(
            f"Torch-Pruning's grouping of the model's channels did not converge (stopped after "
            f"{time.monotonic() - started:.0f} s while following {where!r}: its walk grew far past the size of "
            "the model); models whose residuals pad or slice channels (as ReXNet's do) are not supported. "
            "polarprune_cuda.surgery.tp.GROUPING_SECONDS and GROUPING_STEPS_PER_NODE set the bounds") from None
    finally:
        _DEADLINE.clear()
        bar.close()
    return groups


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int):
    """A tqdm bar on stderr that shows itself only after 3 seconds (none where tqdm is not installed)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="attach_gates: grouping channels", unit="layer", delay=3, leave=False)


def channel_plans(model: nn.Module, inputs, names: dict[nn.Module, str],
                  ignored: list[nn.Module]) -> tuple[list[Plan], list[Refusal]]:
    """The gateable channel groups of ``model`` (not ``ignored``, not the classifier), in module order, and
    every group that cannot be gated with the reason (one pass over all the groups)."""
    graph = _build_graph(model, inputs)
    outputs = _output_layers(graph)
    groups = _all_groups(graph, ignored + outputs, names)
    plans, refused = [], []
    for group in groups:
        try:
            with _exact_splits():
                plans.append(Plan(graph, group, names))
        except UnsupportedModelError as exc:
            root = group[0].dep.target.module
            refused.append(Refusal(names.get(root, str(root)), str(exc)))
    order = {n: i for i, n in enumerate(names.values())}
    plans = sorted((p for p in plans if p.bns or p.mixed or p.weight_gated), key=lambda p: order[p.root])
    return plans, sorted(refused, key=lambda r: order.get(r.root, len(order)))


def remove_channels(model: nn.Module, groups: list[dict], inputs) -> None:
    """Remove every channel a group does not keep, with Torch-Pruning's group pruning (in place)."""
    graph = _build_graph(model, inputs)
    for group in groups:
        keep = set(group["kept"])
        drop = [i for i in range(group["channels"]) if i not in keep]
        if drop and "removed_with" not in group:
            root = model.get_submodule(group["root"])
            with _exact_splits():
                graph.get_pruning_group(root, _out_fn(graph, root), drop).prune()
