"""Triton kernels for polarprune_cuda, installed as ``polarprune_cuda.kernels``.

``IMPLEMENTATIONS`` maps op names of :mod:`polarprune_cuda.ops` to functions
with the same signature as those in :mod:`polarprune_cuda.reference`. The
backend registry (:mod:`polarprune_cuda.backends`) reports the Triton backend
as unavailable while this mapping is empty.
"""
IMPLEMENTATIONS: dict = {}
