"""Whether Triton's CPU interpreter (TRITON_INTERPRET=1) runs the kernels' constructs on this machine.

The kernels loop over ranges whose bounds are tensors (``range(lo, hi, BLOCK)``, grid-stride loops). The
interpreter of triton 3.6 turns such a bound into a Python int with ``int(array)`` on a one-element 1-D numpy
array, which numpy 2.4 and later refuse ("only 0-dimensional arrays can be converted to Python scalars"): with
those versions together no kernel here runs under the interpreter. Compiled kernels on a GPU are not affected.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bounded_loop(x_ptr, lo_ptr, n):
    lo = tl.load(lo_ptr)
    acc = tl.zeros((1,), tl.float32)
    for i in range(lo, n):
        acc += tl.load(x_ptr + i + tl.arange(0, 1))
    tl.store(x_ptr + tl.arange(0, 1), acc)


def interpreter_problem() -> str | None:
    """None when the interpreter runs a tensor-bounded loop, else why not (versions and the error)."""
    import numpy
    import torch

    x = torch.ones(3)
    try:
        _bounded_loop[(1,)](x, torch.zeros(1, dtype=torch.int32), 3)
    except Exception as exc:  # the interpreter wraps what numpy raised
        return (f"Triton's CPU interpreter cannot run the kernels here (triton {triton.__version__}, numpy "
                f"{numpy.__version__}: a loop bounded by a tensor fails with {str(exc)[:160]}); compiled kernels on "
                f"a GPU are not affected")
    if x[0].item() != 3.0:
        return f"Triton's CPU interpreter computed a tensor-bounded loop wrongly (triton {triton.__version__})"
    return None
