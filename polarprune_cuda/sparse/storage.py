"""Compressed storage of a pruned state_dict: values of the kept weights plus a bit mask per tensor; saved with a
digest (_io.save_tensors) and checked before anything is allocated on load."""
from __future__ import annotations

import io
import math

import torch
from torch import Tensor


_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack(mask: Tensor) -> Tensor:
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(-1, 8) * _BITS).sum(1, dtype=torch.uint8)


def _unpack(bits: Tensor, n: int) -> Tensor:
    return ((bits.view(-1, 1) & _BITS) != 0).flatten()[:n]


def sparse_state_dict(state: dict[str, Tensor]) -> dict:
    """A compressed copy: each floating tensor with at least half zeros as a bitmask (1 bit per entry) plus its
    nonzero values; the rest as they are. At 90% sparsity a float32 weight takes 0.525 bytes per entry."""
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if v.is_floating_point() and v.dim() >= 2 and int((v == 0).sum()) * 2 >= v.numel():
            mask = v != 0
            out[k] = {"shape": list(v.shape), "bitmask": _pack(mask), "values": v[mask].clone()}
        else:
            out[k] = v
    return out


def dense_state_dict(sparse: dict) -> dict[str, Tensor]:
    """The inverse of :func:`sparse_state_dict`; ValueError naming the entry when ``sparse`` is not of that form
    (checked before anything is allocated: a packed entry allocates what its bitmask covers, no more)."""
    if not isinstance(sparse, dict):
        raise ValueError(f"a sparse state_dict must be a dict of names to tensors or packed entries, got "
                         f"{type(sparse).__name__}")
    out = {}
    for k, v in sparse.items():
        if not isinstance(k, str):
            raise ValueError(f"sparse state_dict: key {k!r} is not a string")
        if isinstance(v, Tensor):
            out[k] = v
            continue
        if not isinstance(v, dict) or set(v) != {"shape", "bitmask", "values"}:
            raise ValueError(f"sparse state_dict: entry {k!r} must be a tensor or a dict of shape, bitmask and "
                             "values")
        shape, bits, values = v["shape"], v["bitmask"], v["values"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"sparse state_dict: entry {k!r} has shape {shape!r}, not a list of ints >= 0")
        n = math.prod(shape)
        if not isinstance(bits, Tensor) or bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != -(-n // 8):
            raise ValueError(f"sparse state_dict: entry {k!r} needs a 1-D uint8 bitmask of {-(-n // 8)} bytes for "
                             f"shape {shape}")
        mask = _unpack(bits, n)
        if (not isinstance(values, Tensor) or values.dim() != 1 or not values.is_floating_point()
                or values.numel() != int(mask.sum())):
            raise ValueError(f"sparse state_dict: entry {k!r} needs a 1-D floating tensor of its bitmask's "
                             f"{int(mask.sum())} nonzero values")
        dense = torch.zeros(n, dtype=values.dtype, device=values.device)
        dense[mask.to(values.device)] = values
        out[k] = dense.view(shape)
    return out


def serialized_bytes(obj) -> int:
    """Bytes of ``torch.save(obj)``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def save_sparse(state: dict[str, Tensor], path) -> dict:
    """Save the compressed copy to ``path`` (atomically) and its SHA-256 to ``path.sha256``; returns dense and
    compressed sizes in bytes."""
    from pathlib import Path

    from .._io import save_tensors

    save_tensors(sparse_state_dict(state), path)
    return {"dense_bytes": serialized_bytes(state), "sparse_bytes": Path(path).stat().st_size}


def load_sparse(path, map_location="cpu", verify: bool = True) -> dict[str, Tensor]:
    """A dense state_dict from a file written by :func:`save_sparse`.

    The file's digest (``path.sha256``) is checked on the very bytes that are unpickled (with
    ``weights_only=True``); a changed file raises :class:`~polarprune_cuda._io.IntegrityError` (a
    ValueError naming it). ``verify=False`` skips the digest (a file written elsewhere); the structure is
    checked either way.
    """
    from .._io import load_tensors

    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True or False, got {verify!r}")
    sparse = load_tensors(path, map_location=map_location, verify=verify)
    try:
        return dense_state_dict(sparse)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
