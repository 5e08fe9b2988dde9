"""Triton kernels for the gate ops, with the signatures of polarprune_cuda.ops.reference.

One module per op (``binary_gate.py``, ``gate_penalty.py``, ``gate_bank.py``,
``channel_gate.py``, ``gated_affine.py``; an op's ``*_backward`` lives with it),
shared helpers in ``_common.py``. ``IMPLEMENTATIONS`` holds every public
function of those modules that is named after its module (``binary_gate``,
``binary_gate_backward``, ...). The op layer checks it against its one op list,
:data:`polarprune_cuda.ops.common.OPS`, and reports the backend unavailable,
naming what is missing, where the two differ; nothing here imports the package.
"""
from __future__ import annotations

from . import binary_gate as _binary_gate
from . import channel_gate as _channel_gate
from . import gate_bank as _gate_bank
from . import gate_penalty as _gate_penalty
from . import gated_affine as _gated_affine

_MODULES = (_binary_gate, _channel_gate, _gate_bank, _gate_penalty, _gated_affine)


def _implementations() -> dict:
    found = {}
    for module in _MODULES:
        op = module.__name__.rpartition(".")[2]
        for name in (op, op + "_backward"):
            if callable(getattr(module, name, None)):
                found[name] = getattr(module, name)
    return found


#: op name -> Triton implementation (checked against ops.common.OPS by the op layer).
IMPLEMENTATIONS = _implementations()

binary_gate = IMPLEMENTATIONS["binary_gate"]
binary_gate_backward = IMPLEMENTATIONS["binary_gate_backward"]
gate_penalty = IMPLEMENTATIONS["gate_penalty"]
gate_bank = IMPLEMENTATIONS["gate_bank"]
gate_bank_backward = IMPLEMENTATIONS["gate_bank_backward"]
channel_gate = IMPLEMENTATIONS["channel_gate"]
channel_gate_backward = IMPLEMENTATIONS["channel_gate_backward"]
gated_affine = IMPLEMENTATIONS["gated_affine"]
gated_affine_backward = IMPLEMENTATIONS["gated_affine_backward"]
