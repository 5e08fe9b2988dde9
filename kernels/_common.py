"""What the Triton kernels of the gate ops share: block size, accumulation type, the STE and polarization codes.

The kernels are a backend of the op layer and import nothing of the package
they are installed into. The string -> code tables below are the Triton copy of
the one table, :data:`polarprune_cuda.ops.common.STE_CODES` / ``POLAR_CODES``
(as ``csrc/gate_codes.h`` is the C++ copy); ``tests/ops/test_op_schemas.py``
checks that they agree. The ``tl.constexpr`` names let the kernels branch on
the codes by name (``MODE == STE_CLIPPED``).
"""
from __future__ import annotations

import torch
import triton.language as tl

#: ``ste`` argument -> kernel code (the Triton copy of ops.common.STE_CODES).
STE_CODES = {"identity": 0, "clipped": 1, "sigmoid": 2}
#: ``polar_form`` argument -> kernel code (the Triton copy of ops.common.POLAR_CODES).
POLAR_CODES = {"zhuang": 0, "bimodal": 1}

BLOCK = 1024

STE_IDENTITY = tl.constexpr(STE_CODES["identity"])
STE_CLIPPED = tl.constexpr(STE_CODES["clipped"])
STE_SIGMOID = tl.constexpr(STE_CODES["sigmoid"])
POLAR_ZHUANG = tl.constexpr(POLAR_CODES["zhuang"])
POLAR_BIMODAL = tl.constexpr(POLAR_CODES["bimodal"])


def acc_of(dtype: torch.dtype):
    """The Triton accumulation type of a tensor dtype: float64 stays float64, everything else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_ste(ste) -> None:
    if ste not in STE_CODES:
        raise ValueError(f"ste must be one of {tuple(STE_CODES)}, got {ste!r}")


def check_polar_form(polar_form) -> None:
    if polar_form not in POLAR_CODES:
        raise ValueError(f"polar_form must be one of {tuple(POLAR_CODES)}, got {polar_form!r}")
