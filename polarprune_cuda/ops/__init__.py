"""The op layer: the gate math as torch custom ops (``torch.ops.polarprune.*``).

``reference.py`` is the specification (pure PyTorch, also the fallback); one
file per op (``binary_gate.py``, ``gate_penalty.py``, ``gate_bank.py``,
``channel_gate.py``, ``gated_affine.py``) registers it as a custom op with its
fake and autograd rules, dispatches to a backend and holds its checked entry
point; ``common.py`` is what they share (namespace, the op list, the STE and
polarization codes, argument checks); ``backends.py`` is the registry (CUDA
extension, Triton, reference) that says why a backend is missing;
``functional.py`` is the public face over them (every op's checked function,
``ALL_OPS``, and the functions composed from the ops). Nothing here knows
about gates or models.

``ops.gate_penalty`` is the op's own checked wrapper (``rho`` and every weight
given, as the op takes them); ``functional.gate_penalty`` is the penalty with
a target sparsity and defaults, built on it. Every other op name here is the
same function as in ``functional``.
"""
from . import functional, reference
from .backends import BackendUnavailableError, backend_info
from .cost import CostModel
from .functional import ALL_OPS, binary_gate, channel_gate, gate_bank, gated_affine
from .gate_penalty import gate_penalty

__all__ = ["ALL_OPS", "BackendUnavailableError", "CostModel", "backend_info", "binary_gate", "channel_gate",
           "functional", "gate_bank", "gate_penalty", "gated_affine", "reference"]
