"""Triton kernels for polarprune_cuda, installed as ``polarprune_cuda.kernels``.

``IMPLEMENTATIONS`` maps op names of :mod:`polarprune_cuda.ops.functional` to functions
with the signatures of :mod:`polarprune_cuda.ops.reference`. It is empty, with the
reason in ``UNAVAILABLE``, where Triton cannot run: no ``triton`` package,
neither a CUDA device nor ``TRITON_INTERPRET=1`` (Triton's CPU interpreter,
which must be set before this module is imported), or an interpreter that
cannot run the kernels' loops (``_interpreter.py``: triton 3.6 with numpy >= 2.4).
"""
import os

IMPLEMENTATIONS: dict = {}
UNAVAILABLE: str | None = None

try:
    import triton  # noqa: F401
except Exception as exc:  # ImportError, or a broken install
    UNAVAILABLE = f"triton cannot be imported: {exc}"
else:
    import torch

    if torch.cuda.is_available():
        from .triton_gates import IMPLEMENTATIONS  # noqa: F811,F401
    elif os.environ.get("TRITON_INTERPRET") == "1":
        from ._interpreter import interpreter_problem

        UNAVAILABLE = interpreter_problem()
        if UNAVAILABLE is None:
            from .triton_gates import IMPLEMENTATIONS  # noqa: F811,F401
    else:
        UNAVAILABLE = "no CUDA device, and TRITON_INTERPRET=1 is not set"
