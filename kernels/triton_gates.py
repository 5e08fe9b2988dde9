"""Triton kernels for the gate ops, with the signatures of polarprune_cuda.ops.reference.

One module per op (``binary_gate.py``, ``gate_penalty.py``, ``gate_bank.py``,
``channel_gate.py``, ``gated_affine.py``; an op's ``*_backward`` lives with it),
shared helpers in ``_common.py``. ``IMPLEMENTATIONS`` is derived from the one op
list, :data:`polarprune_cuda.ops.common.OPS`: an op without its function in
the module of its name fails this import.
"""
from __future__ import annotations

import torch  # noqa: F401  (tests patch torch.empty through this module)

from polarprune_cuda.ops.common import OPS

from . import binary_gate as _binary_gate
from . import channel_gate as _channel_gate
from . import gate_bank as _gate_bank
from . import gate_penalty as _gate_penalty
from . import gated_affine as _gated_affine

_MODULES = {m.__name__.rpartition(".")[2]: m for m in (_binary_gate, _channel_gate, _gate_bank, _gate_penalty,
                                                        _gated_affine)}


def _kernel_of(op: str):
    module = _MODULES.get(op.removesuffix("_backward"))
    if module is None or not hasattr(module, op):
        raise ImportError(f"op {op!r} (polarprune_cuda.ops.common.OPS) has no Triton function "
                          f"{op.removesuffix('_backward')}.py:{op}")
    return getattr(module, op)


#: op name (common.OPS) -> Triton implementation.
IMPLEMENTATIONS = {name: _kernel_of(name) for name in OPS}

binary_gate = IMPLEMENTATIONS["binary_gate"]
binary_gate_backward = IMPLEMENTATIONS["binary_gate_backward"]
gate_penalty = IMPLEMENTATIONS["gate_penalty"]
gate_bank = IMPLEMENTATIONS["gate_bank"]
gate_bank_backward = IMPLEMENTATIONS["gate_bank_backward"]
channel_gate = IMPLEMENTATIONS["channel_gate"]
channel_gate_backward = IMPLEMENTATIONS["channel_gate_backward"]
gated_affine = IMPLEMENTATIONS["gated_affine"]
gated_affine_backward = IMPLEMENTATIONS["gated_affine_backward"]
