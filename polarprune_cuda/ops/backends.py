"""Backend registry: which implementation of each op runs for which device.

Three backends can implement the ops of :mod:`polarprune_cuda.ops.functional` (names: ``common.OPS``):

* ``cuda``: the compiled extension ``polarprune_cuda._C`` (CUDA tensors only);
* ``triton``: the Triton kernels in ``polarprune_cuda.kernels`` (CUDA tensors,
  or CPU tensors under ``TRITON_INTERPRET=1`` when forced);
* ``torch``: :mod:`polarprune_cuda.ops.reference`, pure PyTorch, every device.

For CUDA tensors the order is cuda, triton, torch; other devices use torch.
``POLARPRUNE_BACKEND=torch|triton|cuda`` forces one backend for every device
and raises if it is not available. A backend that cannot load is probed once,
logged once, and the reason is kept for :func:`backend_info`.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import reference
from .common import OPS  # the one op list
from ..errors import BackendUnavailableError

log = logging.getLogger("polarprune_cuda")

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "POLARPRUNE_BACKEND"
_ORDER = {"cuda": ("cuda", "triton", "torch")}
_DEFAULT_ORDER = ("torch",)




@dataclass
class Backend:
    name: str
    available: bool
    reason: str
    ops: dict[str, Callable] = field(default_factory=dict)
    version: str | None = None


def _probe_torch() -> Backend:
    ops = {name: getattr(reference, name) for name in OPS}
    return Backend("torch", True, "pure PyTorch reference (always available)", ops, torch.__version__)


def _probe_triton() -> Backend:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return Backend("triton", False, f"triton cannot be imported: {exc}")
    try:
        kernels = importlib.import_module("polarprune_cuda.kernels")
    except Exception as exc:
        return Backend("triton", False, f"polarprune_cuda.kernels failed to import: {exc}")
    ops = dict(getattr(kernels, "IMPLEMENTATIONS", {}))
    version = getattr(triton, "__version__", None)
    if not ops:
        reason = getattr(kernels, "UNAVAILABLE", None) or "polarprune_cuda.kernels has no kernels"
        return Backend("triton", False, reason, {}, version)
    missing, extra = [op for op in OPS if op not in ops], sorted(set(ops) - set(OPS))
    if missing or extra:
        return Backend("triton", False, f"polarprune_cuda.kernels does not match the op list (ops.common.OPS): "
                                        f"missing {missing}, unknown {extra}", {}, version)
    where = "Triton's CPU interpreter (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else "CUDA"
    return Backend("triton", True, f"Triton kernels from polarprune_cuda.kernels on {where}", ops, version)


def _build_info() -> dict | None:
    path = Path(__file__).resolve().parents[1] / "_build_info.json"   # polarprune_cuda/_build_info.json
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _probe_cuda() -> Backend:
    if not torch.version.cuda:
        return Backend("cuda", False, "torch is not a CUDA build")
    try:
        importlib.import_module("polarprune_cuda._C")
    except ImportError as exc:
        return Backend("cuda", False, f"extension polarprune_cuda._C is not built or failed to load: {exc}")
    info = _build_info() or {}
    built = info.get("cuda")
    if built and built.split(".")[0] != torch.version.cuda.split(".")[0]:
        return Backend("cuda", False, f"extension polarprune_cuda._C was built for CUDA {built}, torch runs "
                                      f"CUDA {torch.version.cuda}: rebuild it (pip install --no-build-isolation -e .)")
    try:
        ops = {name: getattr(torch.ops.polarprune_C, name) for name in OPS}
    except (AttributeError, RuntimeError) as exc:
        return Backend("cuda", False, f"extension polarprune_cuda._C registers no ops: {exc}")
    where = f" (built for CUDA {built}, archs {info.get('arch_list')})" if built else ""
    return Backend("cuda", True, f"compiled extension polarprune_cuda._C{where}", ops, built)


_PROBES = {"torch": _probe_torch, "triton": _probe_triton, "cuda": _probe_cuda}
_cache: dict[str, Backend] = {}
_choice: dict[tuple[str, str, str | None], Callable] = {}


def get_backend(name: str) -> Backend:
    """Probe (once) and return the named backend."""
    if name not in _PROBES:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name not in _cache:
        backend = _PROBES[name]()
        if not backend.available:
            log.info("polarprune_cuda: backend %r unavailable: %s", name, backend.reason)
        _cache[name] = backend
    return _cache[name]


def forced_backend() -> str | None:
    """The backend named by POLARPRUNE_BACKEND, or None; raises ValueError for an unknown name."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(BACKENDS)} (or unset), got {value!r}")
    return value


def select(op: str, device_type: str) -> tuple[str, Callable]:
    """The backend name and implementation of ``op`` for tensors on ``device_type``."""
    forced = forced_backend()
    key = (op, device_type, forced)
    if key in _choice:
        return _choice[key]
    if forced is not None:
        backend = get_backend(forced)
        if not backend.available:
            raise BackendUnavailableError(f"{ENV_VAR}={forced} but that backend is unavailable: {backend.reason}")
        if op not in backend.ops:
            raise BackendUnavailableError(f"{ENV_VAR}={forced} but that backend has no implementation of {op}")
        if forced == "cuda" and device_type != "cuda":
            raise BackendUnavailableError(f"{ENV_VAR}=cuda runs CUDA tensors only, got tensors on {device_type}")
        if forced == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendUnavailableError(f"{ENV_VAR}=triton runs {device_type} tensors only under "
                                          "TRITON_INTERPRET=1 (Triton's CPU interpreter)")
        result = (forced, backend.ops[op])
    else:
        result = None
        for name in _ORDER.get(device_type, _DEFAULT_ORDER):
            backend = get_backend(name)
            if backend.available and op in backend.ops:
                result = (name, backend.ops[op])
                break
        assert result is not None  # torch implements every op
    _choice[key] = result
    return result


def impl(op: str, device: torch.device) -> Callable:
    """The implementation of ``op`` for tensors on ``device``."""
    return select(op, device.type)[1]


def backend_info() -> dict:
    """Which backends exist here, why the others don't, and which one each device uses.

    Returns a dict with ``backends`` (name -> available, reason, version, ops),
    ``forced`` (the value of POLARPRUNE_BACKEND or None) and ``selected``
    (device type -> backend name used for the ops on that device).
    """
    forced = forced_backend()
    info = {"forced": forced, "torch": torch.__version__, "torch_cuda": torch.version.cuda, "backends": {}}
    for name in BACKENDS:
        b = get_backend(name)
        info["backends"][name] = {
            "available": b.available,
            "reason": b.reason,
            "version": b.version,
            "ops": sorted(b.ops),
        }
    selected = {}
    for device_type in ("cpu", "cuda"):
        try:
            selected[device_type] = select("binary_gate", device_type)[0]
        except BackendUnavailableError as exc:
            selected[device_type] = f"error: {exc}"
    info["selected"] = selected
    info["cuda_device_available"] = torch.cuda.is_available()
    return info


def _reset() -> None:
    """Forget probes and choices (tests that change the environment use this)."""
    _cache.clear()
    _choice.clear()
