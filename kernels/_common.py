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
import triton
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


def scalar_args(values, dtype: torch.dtype, placeholder: torch.Tensor):
    """(IN_MEMORY, args): the float arguments of a kernel, for :func:`scalar`.

    Triton passes a Python float to a kernel as fp32 on a GPU (the interpreter keeps a double), so for
    float64 inputs the values travel as a float64 tensor that the kernel loads (IN_MEMORY); otherwise
    ``args`` is ``placeholder`` (a tensor the launch has anyway: nothing is allocated, the kernel never
    reads it) and the kernel uses its float arguments.
    """
    if dtype == torch.float64:
        return True, torch.tensor([float(v) for v in values], dtype=torch.float64, device=placeholder.device)
    return False, placeholder


@triton.jit
def scalar(args_ptr, value, index: tl.constexpr, IN_MEMORY: tl.constexpr):
    """Float argument ``index`` of a kernel: ``args_ptr[index]`` (float64) when IN_MEMORY, else ``value``."""
    if IN_MEMORY:
        return tl.load(args_ptr + index)
    else:
        return value


def check_ste(ste) -> None:
    if ste not in STE_CODES:
        raise ValueError(f"ste must be one of {tuple(STE_CODES)}, got {ste!r}")


def check_polar_form(polar_form) -> None:
    if polar_form not in POLAR_CODES:
        raise ValueError(f"polar_form must be one of {tuple(POLAR_CODES)}, got {polar_form!r}")
