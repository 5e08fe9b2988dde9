"""Residual blocks whose branch can be gated as a whole, and what replaces a closed one.

A *block* is a module that computes ``act(branch(x) + shortcut(x))``, as the
BasicBlock and Bottleneck of torchvision's ResNets and of this project's CIFAR
ResNets do. It is recognised by its parts: a shortcut attribute
(``downsample`` or ``shortcut``; ``None`` or an empty ``Sequential`` is the
identity), an activation attribute applied after the addition (``relu``,
``act`` or ``activation``) and an affine ``BatchNorm2d`` as its last direct
BatchNorm child (the end of the branch). The recognition is checked
numerically on the example input: with that BatchNorm's affine set to zero
the block must output exactly ``act(shortcut(x))``, else it is not gated.

:class:`ClosedBlock` is that replacement: the block's own shortcut module
(parameters and state-dict keys unchanged) followed by its activation.
:func:`depth` measures the longest chain of convolutions and linear layers
from the input to the output, the depth a ResNet's name counts.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .inputs import tensor_tuple, eval_mode, flatten_outputs

SHORTCUT_ATTRS = ("downsample", "shortcut")
ACT_ATTRS = ("relu", "act", "activation")
_WEIGHTED_NODES = ("ConvolutionBackward", "AddmmBackward", "MmBackward", "LinearBackward")


class ClosedBlock(nn.Module):
    """A residual block with its branch removed: ``act(shortcut(x))``.

    ``shortcut`` and ``act`` keep the attribute names they had in the block
    (``shortcut``/``downsample``, ``relu``), so state-dict keys do not change.
    ``None`` means identity.
    """

    def __init__(self, shortcut: nn.Module | None = None, shortcut_name: str = "shortcut",
                 act: nn.Module | None = None, act_name: str = "relu"):
        super().__init__()
        self.shortcut_name = shortcut_name if shortcut is not None else None
        self.act_name = act_name if act is not None else None
        if shortcut is not None:
            self.add_module(shortcut_name, shortcut)
        if act is not None:
            self.add_module(act_name, act)

    @classmethod
    def from_block(cls, block: nn.Module, shortcut_attr: str | None, act_attr: str | None) -> "ClosedBlock":
        """The closed form of ``block``: it shares the shortcut module; the activation is a copy, never in place."""
        shortcut = getattr(block, shortcut_attr) if shortcut_attr else None
        act = None
        if act_attr:
            act = copy.deepcopy(getattr(block, act_attr))
            if getattr(act, "inplace", False):
                act.inplace = False   # the input may be another layer's saved output
        return cls(shortcut, shortcut_attr or "shortcut", act, act_attr or "relu")

    def forward(self, x: Tensor) -> Tensor:
        if self.shortcut_name is not None:
            x = self._modules[self.shortcut_name](x)
        if self.act_name is not None:
            x = self._modules[self.act_name](x)
        return x

    def extra_repr(self) -> str:
        return "branch removed" + ("" if self.shortcut_name else ", identity shortcut")


@dataclass
class BlockRecord:
    """One block-gated residual block (kept on the bank's surgery record)."""

    name: str                       # module name of the block
    shortcut: str | None            # attribute of the shortcut module (None: identity, no module)
    act: str | None                 # attribute of the activation after the addition
    last_bn: str                    # module name of the branch's last BatchNorm (it carries the block gate)
    branch: list[str] = field(default_factory=list)   # module names inside the branch
    depth_saved: int = 0            # weighted layers on the longest path that removing the branch saves
    segment: int = -1               # the block gate's segment in the bank
    internal: list[int] = field(default_factory=list)  # channel segments that live inside the branch

    def to_spec(self, closed: bool) -> dict:
        return {"name": self.name, "closed": closed, "shortcut": self.shortcut, "act": self.act,
                "depth_saved": self.depth_saved}


def _shortcut_attr(module: nn.Module) -> tuple[bool, str | None]:
    """(is a candidate, shortcut attribute or None for an attribute set to None)."""
    for attr in SHORTCUT_ATTRS:
        if attr in module._modules:
            return True, attr
        if attr in module.__dict__ and module.__dict__[attr] is None:
            return True, None
    return False, None


def _parts(module: nn.Module) -> tuple[str | None, str | None, str] | None:
    """(shortcut attribute, activation attribute, last BatchNorm attribute) of a block, else None."""
    found, shortcut = _shortcut_attr(module)
    if not found:
        return None
    act = next((a for a in ACT_ATTRS if isinstance(module._modules.get(a), nn.Module)), None)
    bns = [n for n, c in module.named_children() if n != shortcut and isinstance(c, nn.BatchNorm2d)]
    if not bns:
        return None
    return shortcut, act, bns[-1]


def find_blocks(model: nn.Module, which) -> list[tuple[nn.Module, tuple]]:
    """Candidate blocks of ``model`` in module order: (module, parts).

    ``which`` is True (every module that looks like a block) or a list of block
    module names (each must look like one, else ValueError naming it).
    """
    if which is True:
        found = [(m, p) for m in model.modules() if m is not model and (p := _parts(m)) is not None]
    else:
        found = []
        for name in which:
            if not isinstance(name, str):
                raise ValueError(f"blocks must be True or a list of module names, got an item {name!r}")
            try:
                m = model.get_submodule(name)
            except AttributeError as exc:
                raise ValueError(f"blocks names {name!r}, which is not a module of the model") from exc
            parts = _parts(m)
            if parts is None:
                raise ValueError(f"blocks names {name!r} ({type(m).__name__}), which is not a residual block: a "
                                 f"block has a shortcut attribute ({' or '.join(SHORTCUT_ATTRS)}) and ends its "
                                 "branch with a BatchNorm2d child")
            found.append((m, parts))
    # a block that contains another block is not gated as a whole (its inner blocks are)
    inner = {id(m) for m, _ in found}
    out = []
    for m, parts in found:
        if any(id(d) in inner for d in m.modules() if d is not m):
            continue
        out.append((m, parts))
    return out


def _branch_modules(block: nn.Module, shortcut: str | None, act: str | None) -> list[nn.Module]:
    skip = set()
    for attr in (shortcut, act):
        if attr:
            skip.update(id(m) for m in block._modules[attr].modules())
    return [m for m in block.modules() if m is not block and id(m) not in skip]


def capture_inputs(model: nn.Module, modules: list[nn.Module], inputs: tuple[Tensor, ...]) -> dict[int, Tensor | None]:
    """The single-tensor input each module sees in one eval forward pass (None if called otherwise)."""
    seen: dict[int, Tensor | None] = {}

    def pre(module, args):
        key = id(module)
        ok = len(args) == 1 and isinstance(args[0], Tensor) and key not in seen
        seen[key] = args[0].detach().clone() if ok else None

    handles = [m.register_forward_pre_hook(pre) for m in modules]
    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def check_block(block: nn.Module, parts, x: Tensor) -> str | None:
    """Why ``block`` cannot be closed into ``act(shortcut(x))`` (None when it can)."""
    shortcut, act, last_bn = parts
    bn = block._modules[last_bn]
    if type(bn) is not nn.BatchNorm2d or not bn.affine:
        return f"its last BatchNorm {last_bn!r} is not an affine nn.BatchNorm2d"
    closed = ClosedBlock.from_block(block, shortcut, act)
    saved = (bn.weight.detach().clone(), bn.bias.detach().clone())
    with eval_mode(block), torch.no_grad():
        try:
            bn.weight.zero_()
            bn.bias.zero_()
            out = block(x)
            ref = closed(x)
        finally:
            bn.weight.copy_(saved[0])
            bn.bias.copy_(saved[1])
    if not isinstance(out, Tensor) or out.shape != ref.shape:
        return "its output with the branch closed does not have the shortcut's shape"
    if not torch.allclose(out, ref, rtol=1e-6, atol=1e-6):
        return (f"with {last_bn!r} zeroed it does not output {act or 'identity'}({shortcut or 'x'}) "
                "(the branch must end with that BatchNorm and be added to the shortcut)")
    return None


def prepare_blocks(model: nn.Module, names: dict[nn.Module, str], inputs: tuple[Tensor, ...],
                   which) -> list[BlockRecord]:
    """The blocks of ``model`` that can be block-gated, with their branch and the depth closing them saves.

    Candidates that fail the numerical check are skipped with a warning when
    ``which`` is True, and raise ValueError when the user named them.
    """
    candidates = find_blocks(model, which)
    captured = capture_inputs(model, [m for m, _ in candidates], inputs)
    records = []
    for block, parts in candidates:
        name = names[block]
        x = captured.get(id(block))
        why = "it is not called exactly once with one tensor" if x is None else check_block(block, parts, x)
        if why is None:
            shortcut, act, last_bn = parts
            closed = ClosedBlock.from_block(block, shortcut, act)
            saved = depth(block, x) - depth(closed, x)
            branch = [names[m] for m in _branch_modules(block, shortcut, act)]
            records.append(BlockRecord(name, shortcut, act, f"{name}.{last_bn}", branch, saved))
            continue
        message = f"block {name!r} ({type(block).__name__}) is not block-gated: {why}"
        if which is True:
            warnings.warn(message, stacklevel=3)
        else:
            raise ValueError(message)
    return records


def close_blocks(model: nn.Module, blocks: list[dict], strict: bool = False) -> None:
    """Replace every block the spec entries mark closed by its :class:`ClosedBlock` (in place).

    With ``strict`` (loading a spec), each closed block must be recognised as a block of ``model`` whose
    shortcut and activation attributes are the entry's, else ValueError "spec does not match the model".
    """
    for entry in blocks:
        if not entry.get("closed"):
            continue
        name = entry["name"]
        try:
            block = model.get_submodule(name)
        except Exception:
            block = None
        if block is None or block is model:
            raise ValueError(f"spec does not match the model: block {name!r} of the spec is not in the model")
        for attr in (entry.get("shortcut"), entry.get("act")):
            if attr and not isinstance(getattr(block, attr, None), nn.Module):
                raise ValueError(f"spec does not match the model: block {name!r} has no module {attr!r}")
        if strict:
            parts = _parts(block)
            if parts is None:
                raise ValueError(f"spec does not match the model: {name!r} ({type(block).__name__}) is not a "
                                 "residual block")
            if (entry.get("shortcut"), entry.get("act")) != parts[:2]:
                raise ValueError(f"spec does not match the model: block {name!r} has shortcut {parts[0]!r} and "
                                 f"activation {parts[1]!r}, the spec says {entry.get('shortcut')!r} and "
                                 f"{entry.get('act')!r}")
        closed = ClosedBlock.from_block(block, entry.get("shortcut"), entry.get("act"))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, closed)


def depth(model: nn.Module, example_inputs) -> int:
    """Longest chain of convolutions and linear layers from the input to the output (e.g. 56 for ResNet-56).

    Measured on the autograd graph of one eval forward pass, so it sees the
    model as it runs (a ResNet's 1x1 projection shortcuts run beside the
    branch and do not add to it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = tensor_tuple(example_inputs)
    if inputs is None:
        raise TypeError("example_inputs must be a tensor (or a tuple of tensors) shaped like one batch of input")
    inputs = tuple(t.detach().clone().requires_grad_(True) if t.is_floating_point() else t for t in inputs)
    with eval_mode(model), torch.enable_grad():
        out = model(*inputs)
    outs = flatten_outputs(out)
    memo: dict = {}
    best = 0
    for t in outs:
        if t.grad_fn is None:
            continue
        stack = [(t.grad_fn, False)]
        while stack:
            node, ready = stack.pop()
            if node in memo:
                continue
            children = [f for f, _ in node.next_functions if f is not None]
            if ready:
                own = 1 if type(node).__name__.startswith(_WEIGHTED_NODES) else 0
                memo[node] = own + max((memo[c] for c in children), default=0)
            else:
                stack.append((node, True))
                stack.extend((c, False) for c in children if c not in memo)
        best = max(best, memo[t.grad_fn])
    return best


__all__ = ["BlockRecord", "ClosedBlock", "depth"]
