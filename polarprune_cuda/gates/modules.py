"""Gate modules: activation and affine gates, and gating plain layers in place.

* :class:`ChannelGate`: drop-in activation gate ``y = x * g[c]``.
* :class:`GatedBatchNorm2d`: a ``BatchNorm2d`` whose affine is gated
  (``gamma * g``, ``beta * g``): work over C numbers, no pass over activations.
* :class:`GatedConv2d`, :class:`GatedLinear`: output channels gated through the weights.

A gate module works on its own (with its own ``gate_scores`` parameter) until
:func:`~polarprune_cuda.gates.bank.bind_gates` gathers the gate modules of a
model into a :class:`~polarprune_cuda.gates.bank.GateBank` (``bank.py``).
Several modules may share one segment (channels coupled by residual additions).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import functional
from ..ops.common import check_ste, is_number

def _init_scores(num_channels, init, name: str = "init") -> Tensor:
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
    if isinstance(init, Tensor):
        if init.shape != (num_channels,):
            raise ValueError(f"{name} must have shape ({num_channels},), got {tuple(init.shape)}")
        if not init.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {init.dtype}")
        return init.detach().to(torch.float32).clone()
    if not is_number(init):
        raise ValueError(f"{name} must be a finite number or a tensor of shape ({num_channels},), got {init!r}")
    return torch.full((num_channels,), float(init), dtype=torch.float32)


class GateMixin:
    """What every gate-owning module has: ``num_gates``, ``scores``, ``gate()``."""

    num_gates: int
    ste: str
    tau: float

    def _setup_gate(self, num_channels: int, init, ste: str, tau: float) -> None:
        check_ste(ste, tau)
        self.num_gates = num_channels
        self.ste = ste
        self.tau = float(tau)
        self.gate_scores = nn.Parameter(_init_scores(num_channels, init))
        object.__setattr__(self, "_bank", None)
        self._segment = -1
        self._repeat = 1
        self._block = -1

    @property
    def gate_index(self) -> Tensor | None:
        """Per channel, the bank gate it reads (an index into the bank's flat gates, -1: ungated, gate 1), for a
        module whose channels come from several groups (after a concatenation); None: one segment."""
        return self._buffers.get("_pp_gate_index") if hasattr(self, "_buffers") else None

    @property
    def bank(self) -> nn.Module | None:   # the GateBank (bank.py imports this module, so it is not named here)
        return self._bank

    @property
    def gate_segment(self) -> int:
        """The bank segment this module reads its gates from (-1: not bound to a bank)."""
        return self._segment

    @property
    def gate_repeat(self) -> int:
        """How many times the segment's gates tile over this module's channels (grouped convolutions)."""
        return self._repeat

    @property
    def block_segment(self) -> int:
        """The block gate segment that also multiplies this module's gates (-1: none)."""
        return getattr(self, "_block", -1)

    @property
    def plain_class(self) -> type | None:
        """The plain class :func:`gate_in_place` swapped out (None: built as a gate module, not gated in place)."""
        return getattr(self, "_pp_plain_class", None)

    @property
    def scores(self) -> Tensor:
        """This module's gate scores (a view into the bank when bound)."""
        if self._bank is None:
            return self.gate_scores
        return self._bank.segment_scores(self._segment)

    def gate(self) -> Tensor:
        """Hard gates of this module (exactly 0/1), differentiable to the scores."""
        if self._bank is None:
            return functional.binary_gate(self.gate_scores, self.ste, self.tau)
        return self.gate_from(self._bank.gates())

    def gate_from(self, chunks: tuple[Tensor, ...]) -> Tensor:
        """This module's gates, given the bank's gates per segment (``bank.gates()``, or hard copies of them)."""
        index = self.gate_index
        if index is not None:
            flat = torch.cat([*chunks, chunks[0].new_ones(1)])
            return flat[index]          # -1 reads the appended 1: channels of ungated groups
        g = chunks[self._segment]
        g = g if self._repeat == 1 else g.repeat(self._repeat)
        block = self.block_segment
        return g if block < 0 else g * chunks[block]

    def _bind(self, bank: nn.Module, segment: int, repeat: int = 1, index: Tensor | None = None) -> None:
        """Read gates from ``bank``'s ``segment`` (tiled ``repeat`` times), or through ``index`` (one flat bank
        gate per channel, -1 for none), instead of own scores."""
        if "gate_scores" in self._parameters:
            del self.gate_scores
        self.ste, self.tau = bank.ste, bank.tau
        object.__setattr__(self, "_bank", bank)
        self._segment = segment
        self._repeat = repeat
        if not hasattr(self, "_block"):
            self._block = -1
        if index is not None:   # non-persistent: moves with .to(), not in the state_dict
            self.register_buffer("_pp_gate_index", index.to(torch.long), persistent=False)

    def bind_block(self, segment: int) -> None:
        """Also multiply the gates by the (size-1) block gate of ``segment``: this module ends a residual branch."""
        if self._bank is None:
            raise ValueError("bind the module to a bank before giving it a block gate")
        if self.gate_index is not None:
            raise ValueError("a module whose channels come from several groups cannot also end a gated block")
        if self._bank.sizes[segment] != 1:
            raise ValueError(f"a block gate segment has one gate, segment {segment} has {self._bank.sizes[segment]}")
        self._block = segment

    def _gate_repr(self) -> str:
        where = f"segment={self._segment}" if self._bank is not None else "unbound"
        if self.gate_index is not None:
            where = "channels of several segments"
        if self._repeat > 1:
            where += f", repeat={self._repeat}"
        if self.block_segment >= 0:
            where += f", block={self._block}"
        return f"ste={self.ste!r}, tau={self.tau}, {where}"


class ChannelGate(GateMixin, nn.Module):
    """Activation gate ``y = x * g[c]`` with ``g = 1[s > 0]`` and a straight-through backward.

    Args:
        num_channels: C, the size of dim 1 of the input (N, C, ...).
        init: initial score (number or tensor of shape (C,)); positive means open.
        ste: straight-through mode, ``identity``, ``clipped`` or ``sigmoid``.
        tau: temperature of the gate probability ``sigmoid(s / tau)``.

    Use it where no affine follows a layer; after a BatchNorm prefer
    :class:`GatedBatchNorm2d`, which gates the affine instead of the activations.
    """

    def __init__(self, num_channels: int, init=1.0, ste: str = "identity", tau: float = 1.0):
        super().__init__()
        self._setup_gate(num_channels, init, ste, tau)

    def forward(self, x: Tensor) -> Tensor:
        return functional.channel_gate(x, self.gate())

    def extra_repr(self) -> str:
        return f"{self.num_gates}, {self._gate_repr()}"


class GatedBatchNorm2d(GateMixin, nn.BatchNorm2d):
    """``BatchNorm2d`` whose affine is gated: weight ``gamma * g``, bias ``beta * g``.

    Closed channels output exact zeros. The gate costs work over C numbers, not
    over the N*C*H*W activations. Takes BatchNorm2d's arguments plus ``init``,
    ``ste`` and ``tau`` (see :class:`ChannelGate`); ``affine`` must be True.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        init=1.0,
        ste: str = "identity",
        tau: float = 1.0,
    ):
        if not affine:
            raise ValueError("affine must be True for GatedBatchNorm2d (the gate scales the affine); "
                             "use ChannelGate after a BatchNorm2d without affine")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._setup_gate(num_features, init, ste, tau)
        if device is not None:
            self.gate_scores.data = self.gate_scores.data.to(device)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, init=1.0, ste: str = "identity", tau: float = 1.0):
        """A gated copy of ``bn`` sharing its parameters and buffers."""
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  init=init, ste=ste, tau=tau)
        new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
        new.gate_scores.data = new.gate_scores.data.to(bn.weight.device)
        new.train(bn.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        weight, bias = functional.gated_affine(self.weight, self.bias, self.gate())
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_stats = not self.training or self.track_running_stats
        return F.batch_norm(
            x,
            self.running_mean if keep_stats else None,
            self.running_var if keep_stats else None,
            weight,
            bias,
            use_batch_stats,
            factor,
            self.eps,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._gate_repr()}"


class GatedConv2d(GateMixin, nn.Conv2d):
    """A ``Conv2d`` whose output channels are gated through its weights (and bias).

    Used where no BatchNorm follows a convolution: ``conv(x, W * g, b * g)``
    equals ``conv(x, W, b) * g`` per output channel. Created by
    :func:`~polarprune_cuda.attach_gates` from an existing ``Conv2d``.
    """

    def forward(self, x: Tensor) -> Tensor:
        g = self.gate().to(self.weight.dtype)
        weight = self.weight * g.view(-1, 1, 1, 1)
        bias = None if self.bias is None else self.bias * g
        return self._conv_forward(x, weight, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._gate_repr()}"


class GatedLinear(GateMixin, nn.Linear):
    """A ``Linear`` whose output features are gated through its weights (and bias)."""

    def forward(self, x: Tensor) -> Tensor:
        g = self.gate().to(self.weight.dtype)
        bias = None if self.bias is None else self.bias * g
        return F.linear(x, self.weight * g.view(-1, 1), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._gate_repr()}"


class GatedNormMixin(GateMixin):
    """Gates a ``BatchNorm2d`` subclass in place and keeps its own forward (timm's ``BatchNormAct2d``, a
    user's norm): while that forward runs, ``self.weight`` and ``self.bias`` read ``gamma * g`` and
    ``beta * g``, so whatever the class does after the affine (an activation, dropout) follows as it did.
    The gated class is made once per subclass (:func:`gated_class`)."""

    def forward(self, *args, **kwargs):
        weight, bias = functional.gated_affine(self._parameters["weight"], self._parameters["bias"], self.gate())
        self.__dict__["_pp_affine"] = (weight, bias)
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.__dict__.pop("_pp_affine", None)

    def __getattr__(self, name: str):
        if name in ("weight", "bias"):
            affine = self.__dict__.get("_pp_affine")
            if affine is not None:
                return affine[0] if name == "weight" else affine[1]
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._gate_repr()}"


#: plain class -> gated class that gates it in place (class swap: same parameters, same state_dict keys)
GATED_CLASS = {nn.BatchNorm2d: GatedBatchNorm2d, nn.Conv2d: GatedConv2d, nn.Linear: GatedLinear}
_NORM_SUBCLASSES: dict[type, type] = {}


def gated_class(cls: type) -> type | None:
    """The class that gates ``cls`` in place: GATED_CLASS for the plain classes; for a subclass of
    ``BatchNorm2d`` a subclass of it with :class:`GatedNormMixin` (made once); None for anything else."""
    if cls in GATED_CLASS:
        return GATED_CLASS[cls]
    if isinstance(cls, type) and issubclass(cls, nn.BatchNorm2d) and not issubclass(cls, GateMixin):
        if cls not in _NORM_SUBCLASSES:
            _NORM_SUBCLASSES[cls] = type(f"Gated{cls.__name__}", (GatedNormMixin, cls),
                                         {"__module__": __name__, "__doc__": f"{cls.__name__}, gated in place."})
        return _NORM_SUBCLASSES[cls]
    return None


def gate_in_place(module: nn.Module, bank: nn.Module, segment: int, repeat: int = 1,
                  index: Tensor | None = None) -> GateMixin:
    """Turn a plain BatchNorm2d/Conv2d/Linear (or a BatchNorm2d subclass) into its gated class, bound to
    ``bank``'s ``segment`` (or, with ``index``, to one flat bank gate per channel).

    Parameters, buffers, hooks and state_dict keys stay as they were.
    """
    cls = gated_class(type(module))
    if cls is None:
        raise TypeError(f"only {', '.join(c.__name__ for c in GATED_CLASS)} and subclasses of BatchNorm2d can be "
                        f"gated in place, got {type(module).__name__}")
    channels = module.num_features if isinstance(module, nn.BatchNorm2d) else module.weight.shape[0]
    module._pp_plain_class = type(module)
    module.__class__ = cls
    module.num_gates = channels
    object.__setattr__(module, "_bank", None)
    module._block = -1
    module._bind(bank, segment, repeat, index)
    return module


def fold_in_place(module: GateMixin, gate: Tensor) -> nn.Module:
    """Multiply a gated module's affine (or weights) by ``gate`` and give it back its plain class."""
    plain = getattr(module, "_pp_plain_class", None)
    if plain is None:
        raise TypeError(f"{type(module).__name__} was not gated in place")
    with torch.no_grad():
        g = gate.to(module.weight.dtype)
        shape = (-1,) + (1,) * (module.weight.dim() - 1)
        module.weight.mul_(g.view(shape))
        if module.bias is not None:
            module.bias.mul_(g)
    for attr in ("num_gates", "ste", "tau", "_segment", "_repeat", "_block", "_pp_plain_class"):
        module.__dict__.pop(attr, None)
    module._buffers.pop("_pp_gate_index", None)
    object.__delattr__(module, "_bank")
    module.__class__ = plain
    return module


def gate_modules(model: nn.Module) -> list[tuple[str, GateMixin]]:
    """(name, module) for every gate module of ``model``, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GateMixin)]
