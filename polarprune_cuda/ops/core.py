"""The op layer's face: every ``polarprune::*`` custom op and its validated entry point.

One op lives in one file (schema, fake impl, autograd rule, public wrapper):
:mod:`.binary_gate`, :mod:`.gate_penalty`, :mod:`.gate_bank`,
:mod:`.channel_gate`, :mod:`.gated_affine`; what they share (namespace, op
list, STE and polarization codes, argument checks) is :mod:`.common`. Each op's
implementation asks :mod:`.backends` for the kernel of the tensors' device
(CUDA extension, Triton, or the pure-PyTorch reference); backward passes are
ops of their own, so every backend can fuse them. Schemas are owned here, in
Python (from the annotations of each op function); the compiled extension
defines the same schemas under ``polarprune_C::`` and tests/ops/test_op_schemas.py
checks that they agree.
"""
from __future__ import annotations

# the raw ops are reached by name through ALL_OPS (opcheck, registration tests)
from .binary_gate import binary_gate
from .channel_gate import channel_gate
from .common import (
    DEFINED,
    NAMESPACE,
    OPS,
    POLAR_CODES,
    POLAR_FORMS,
    STE_CODES,
    STE_MODES,
    check_float,
    check_gate_for,
    check_penalty,
    check_scores,
    check_ste,
    check_target_sparsity,
    check_tau,
    is_number,
)
from .gate_bank import gate_bank
from .gate_penalty import gate_penalty
from .gated_affine import check_affine, gated_affine

_missing = [name for name in OPS if name not in DEFINED]
if _missing:
    raise ImportError(f"ops listed in common.OPS but defined by no op module: {_missing}")

#: Every op of the namespace (in common.OPS order), for opcheck and registration tests.
ALL_OPS = {name: DEFINED[name] for name in OPS}


__all__ = [
    "ALL_OPS", "NAMESPACE", "OPS", "POLAR_CODES", "POLAR_FORMS", "STE_CODES", "STE_MODES",
    "binary_gate", "channel_gate", "gate_bank", "gate_penalty", "gated_affine",
    "check_affine", "check_float", "check_gate_for", "check_penalty", "check_scores", "check_ste",
    "check_target_sparsity", "check_tau", "is_number",
]
