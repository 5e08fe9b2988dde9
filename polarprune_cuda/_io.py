"""Safe files: atomic writes, digests, and reading tensors files that were written by this package.

* :func:`atomic_write` writes a temporary file in the target's folder, then
  renames it over the target: a reader never sees a partial file. The file
  gets the mode the user's umask gives (``tempfile`` alone would give 0600).
* :func:`save_tensors` / :func:`load_tensors`: ``torch.save`` plus a
  ``NAME.sha256`` file beside it (the format of ``sha256sum``, so
  ``sha256sum -c weights.pt.sha256`` checks it too); loading verifies the
  digest on the very bytes it then unpickles, with ``weights_only=True``.
* :func:`check_archive`: a ``torch.save`` archive's records checked against
  the file's size before ``torch.load`` expands them.
* :func:`content_digest`: a digest of a nested structure of tensors, numbers
  and strings (a checkpoint), independent of how it was serialized.
* :func:`remove_stale_temps`: temporary files that a killed process left.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import torch
from .errors import IntegrityError

DIGEST_SUFFIX = ".sha256"
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{4,}\.tmp$")




def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then rename the file onto ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, _default_mode())
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_in_the_way(path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file (so ``path`` cannot be created), else None."""
    for parent in Path(path).parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def write_text(path, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_file(path) -> Path:
    """The digest file that belongs to ``path`` (``NAME.sha256`` beside it)."""
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def save_tensors(obj, path) -> str:
    """``torch.save(obj)`` to ``path`` atomically, then its SHA-256 to ``NAME.sha256``; returns the digest."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    digest = sha256_bytes(data)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    write_text(digest_file(path), f"{digest}  {path.name}\n")
    return digest


def read_digest(path) -> str:
    """The digest recorded for ``path``; IntegrityError when there is none or it is malformed."""
    path = Path(path)
    sidecar = digest_file(path)
    if not sidecar.is_file():
        raise IntegrityError(f"{path} has no digest file {sidecar.name} beside it, so its contents cannot be "
                             "verified; it was not written by polarprune_cuda's save (or the digest was lost)")
    try:
        text = sidecar.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{sidecar} cannot be read as a SHA-256 digest ({exc})") from None
    digest, _, name = text.strip().partition("  ")
    if not re.fullmatch(r"[0-9a-f]{64}", digest) or name != path.name:
        raise IntegrityError(f"{sidecar} is not a SHA-256 digest of {path.name} (expected '<64 hex digits>  "
                             f"{path.name}')")
    return digest


def read_verified(path) -> bytes:
    """The bytes of ``path`` after checking them against its digest file."""
    path = Path(path)
    expected = read_digest(path)
    data = path.read_bytes()
    if sha256_bytes(data) != expected:
        raise IntegrityError(f"{path} does not match its digest ({digest_file(path).name}): the file was changed "
                             "or damaged after it was written; restore it or write it again")
    return data


def check_archive(source, name) -> None:
    """Refuse a ``torch.save`` archive (``source``: a path or the file's bytes) whose records could expand past
    the file before ``torch.load`` reads them: ``torch.save`` stores its records uncompressed, so a compressed
    record, or one that declares more bytes than the file holds, is not its work (a 4 MB file can declare
    gigabytes). A file that is not a zip archive (the legacy format) holds its data in itself; it passes."""
    f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    with f:
        if not zipfile.is_zipfile(f):
            return
        size = f.seek(0, io.SEEK_END)
        f.seek(0)
        try:
            infos = zipfile.ZipFile(f).infolist()
        except Exception as exc:   # noqa: BLE001 - whatever zipfile makes of damaged bytes
            raise IntegrityError(f"{name} is corrupt: a damaged archive ({type(exc).__name__}: {exc})") from None
        total = 0
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                raise IntegrityError(f"{name}: record {info.filename!r} is compressed; torch.save never "
                                     "compresses, and a compressed record can expand far past the file's size")
            total += info.file_size
            if info.file_size != info.compress_size or total > size:
                raise IntegrityError(f"{name}: record {info.filename!r} declares {info.file_size} bytes, more "
                                     f"than the file's {size} bytes hold")


def load_failure(exc: BaseException) -> str:
    """One line for a failed ``torch.load(weights_only=True)``: what the file held, without torch's paragraphs
    (nor its advice to load with ``weights_only=False``, which would run whatever code the file names)."""
    text = str(exc)
    if text.startswith("Weights only load failed"):
        parts = [p.strip() for p in re.split(r"\n\s*\n", text)[1:]]
        parts = [re.sub(r"^.*?WeightsUnpickler error:\s*", "", p, flags=re.S) for p in parts
                 if p and not p.startswith("Check the documentation")]
        core = "; ".join(" ".join(p.split()) for p in parts if p.strip())
        return f"it holds something other than tensors and plain data ({core or 'unsupported content'})"
    first = " ".join(text.strip().splitlines()[:1]) or type(exc).__name__
    return f"{type(exc).__name__}: {first[:300]}"


def load_tensors(path, map_location="cpu", verify: bool = True):
    """``torch.load(weights_only=True)`` of a file written by :func:`save_tensors`, its digest checked first.

    ``verify=False`` skips the digest (a file from elsewhere); the load stays ``weights_only``.
    """
    path = Path(path)
    data = read_verified(path) if verify else path.read_bytes()
    check_archive(data, path)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise IntegrityError(f"{path} cannot be read as tensors: {load_failure(exc)}") from None


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, bool):
        h.update(f"B{obj}".encode())
    elif isinstance(obj, int):
        h.update(f"I{obj};".encode())
    elif isinstance(obj, float):
        h.update(f"F{obj.hex()};".encode())
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(f"S{len(data)}:".encode())
        h.update(data)
    elif isinstance(obj, bytes):
        h.update(f"Y{len(obj)}:".encode())
        h.update(obj)
    elif isinstance(obj, (torch.dtype, torch.device, torch.Size)):
        h.update(f"O{obj!r}".encode())
    else:
        raise TypeError(f"content_digest: cannot digest a {type(obj).__name__}")


def content_digest(obj) -> str:
    """SHA-256 of a nested structure (dicts in their order, lists, tensors with dtype and shape, numbers,
    strings): equal for equal contents however they were serialized."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def remove_stale_temps(folder, names) -> list[Path]:
    """Remove the temporary files that :func:`atomic_write` left in ``folder`` for the files ``names``
    (a process killed during a write); returns what was removed. Only call it while holding the folder."""
    folder = Path(folder)
    names = set(names)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = TEMP_NAME.match(entry.name)
        if m and m.group("name") in names and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
