"""The op layer: the gate math as torch custom ops (``torch.ops.polarprune.*``).

``reference.py`` is the specification (pure PyTorch, also the fallback);
``core.py`` registers the custom ops with their fake and autograd rules and
dispatches to a backend; ``backends.py`` is the registry (CUDA extension,
Triton, reference) that says why a backend is missing; ``functional.py`` is
the checked public API over them. Nothing here knows about gates or models.
"""
from .core import ALL_OPS, binary_gate, channel_gate, gate_bank, gate_penalty, gated_affine

__all__ = ["ALL_OPS", "binary_gate", "channel_gate", "gate_bank", "gate_penalty", "gated_affine"]
