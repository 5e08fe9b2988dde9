"""The op layer: the gate math as torch custom ops (``torch.ops.polarprune.*``).

``reference.py`` is the specification (pure PyTorch, also the fallback); one
file per op (``binary_gate.py``, ``gate_penalty.py``, ``gate_bank.py``,
``channel_gate.py``, ``gated_affine.py``) registers it as a custom op with its
fake and autograd rules, dispatches to a backend and holds its checked entry
point; ``common.py`` is what they share (namespace, the op list, the STE and
polarization codes, argument checks); ``core.py`` gathers them (``ALL_OPS``);
``backends.py`` is the registry (CUDA extension, Triton, reference) that says
why a backend is missing; ``functional.py`` is the checked public API over
them. Nothing here knows about gates or models.
"""
from . import functional, reference
from .backends import BackendUnavailableError, backend_info
from .core import ALL_OPS, binary_gate, channel_gate, gate_bank, gate_penalty, gated_affine
from .cost import CostModel

__all__ = ["ALL_OPS", "BackendUnavailableError", "CostModel", "backend_info", "binary_gate", "channel_gate",
           "functional", "gate_bank", "gate_penalty", "gated_affine", "reference"]
