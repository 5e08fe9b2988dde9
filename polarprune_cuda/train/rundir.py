"""Output folders: what a run may touch, and one run at a time.

A run folder holds ``manifest.json``, the list of the files polarprune wrote
there (each claimed before it is written), and ``.polarprune.lock``, an
exclusive lock (``flock``) that a run holds from start to end; the operating
system drops it when the process dies, so ``kill -9`` never leaves a folder
locked. The rules the command line follows (:meth:`RunFolder.prepare`):

* a folder that holds files and no manifest is not polarprune's: refused,
  with or without ``--overwrite``;
* ``--overwrite`` removes only the files the manifest lists (a user's own
  files beside them stay);
* a second run on a folder whose lock is held is refused, naming the pid of
  the holder;
* temporary files of an interrupted write are removed when the folder is
  next used.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
from pathlib import Path

from .._io import TEMP_NAME, file_in_the_way, remove_stale_temps, write_text
from ..errors import RunFolderError

MANIFEST = "manifest.json"
LOCK_FILE = ".polarprune.lock"
MANIFEST_FORMAT = 1
MAX_MANIFEST_BYTES = 16 * 2 ** 20   # a manifest lists file names: 16 MiB is over 100,000 of them
LIBRARY = "polarprune_cuda"




try:   # POSIX
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except (BlockingIOError, PermissionError):
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
except ImportError:   # Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


_HELD: dict[str, list] = {}   # resolved folder -> [fd, count]: one process may take its own lock again
_HELD_LOCK = threading.Lock()


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _check_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"out: {path} is a file, not a folder; choose another --out")
    blocker = file_in_the_way(path)
    if blocker is not None:
        raise RunFolderError(f"out: {blocker} is a file, so {path} cannot be created; choose another --out")


def _refuse_foreign(path: Path) -> None:
    """A folder that holds files and no manifest of polarprune's is refused (RunFolderError naming the first
    ones); the walk stops at the fourth file, so ``--out ~`` or ``/`` is refused at once."""
    if not path.is_dir():
        return
    data, why = RunFolder(path)._manifest()
    if data is not None:
        return
    if why is not None:
        raise RunFolderError(f"out: {path / MANIFEST} is malformed ({why}), so which files of {path} polarprune "
                             "wrote is unknown; it removes and replaces none of them: repair it, or choose a new "
                             "or empty --out")
    found: list[str] = []
    for root, dirs, names in os.walk(path):   # lazily: stops at the fourth file
        dirs.sort()
        rel = Path(root).relative_to(path)
        found += [(rel / n).as_posix() for n in sorted(names) if not (rel == Path(".") and n == LOCK_FILE)]
        if len(found) > 3:
            break
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise RunFolderError(f"out: {path} holds files that polarprune did not write ({shown}); it never removes "
                             "or replaces those, even with --overwrite: choose a new or empty --out")


@contextlib.contextmanager
def locked(path, foreign_ok: bool = True):
    """Hold the folder's exclusive lock (creating the folder) for the ``with`` block; RunFolderError naming the
    holder's pid when another process holds it. Re-entrant within one process. ``foreign_ok=False`` (the
    command line's ``--out``): a folder with files and no manifest is refused before a lock is made in it."""
    path = Path(path)
    _check_folder(path)
    if not foreign_ok:
        _refuse_foreign(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"out: cannot create {path} ({exc.strerror or exc})") from None
    key = str(path.resolve())
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
    if held is None:
        lock_path = path / LOCK_FILE
        try:
            # never through a link: a planted .polarprune.lock -> ~/somefile must not be truncated
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as exc:
            if lock_path.is_symlink():
                raise RunFolderError(f"out: {lock_path} is a symbolic link; polarprune uses only real files in "
                                     "its folder: choose another --out") from None
            raise RunFolderError(f"out: cannot write in {path} ({exc.strerror or exc}); choose another --out") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:   # a hard link: its other names are outside files
            os.close(fd)
            raise RunFolderError(f"out: {lock_path} is not a file of polarprune's own (it has {st.st_nlink} names: "
                                 "a hard link); remove it or choose another --out")
        if not _try_lock(fd):
            os.close(fd)
            raise RunFolderError(f"out: {path} is in use by another polarprune run (pid {_holder(lock_path)}); "
                                 "wait for it to finish or choose another --out")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass
        with _HELD_LOCK:
            _HELD[key] = [fd, 1]
    try:
        yield path
    finally:
        with _HELD_LOCK:
            held = _HELD[key]
            held[1] -= 1
            release = held[1] == 0
            if release:
                del _HELD[key]
        if release:
            fd = held[0]
            with contextlib.suppress(OSError):
                _unlock(fd)
            os.close(fd)


def is_locked_here(path) -> bool:
    """Whether this process holds the folder's lock."""
    return str(Path(path).resolve()) in _HELD


class RunFolder:
    """An output folder and its manifest (see the module's docstring)."""

    def __init__(self, path):
        self.path = Path(path)

    # -------------------------------------------------------------- manifest
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def manifest(self) -> dict | None:
        """The manifest, None when the folder has none (or one that is not polarprune's)."""
        return self._manifest()[0]

    def _manifest(self) -> tuple[dict | None, str | None]:
        """(the manifest or None, why a manifest.json that is there is not one of polarprune's, or None). The
        file is read only up to MAX_MANIFEST_BYTES."""
        try:
            st = self.manifest_path.lstat()
        except OSError:
            return None, None
        if not stat.S_ISREG(st.st_mode):
            return None, "it is not a regular file"
        if st.st_size > MAX_MANIFEST_BYTES:
            return None, f"it has {st.st_size} bytes, more than a manifest has ({MAX_MANIFEST_BYTES} at most)"
        try:
            with open(self.manifest_path, "rb") as f:
                data = json.loads(f.read(MAX_MANIFEST_BYTES + 1).decode("utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            return None, f"it is not valid JSON ({type(exc).__name__})"
        if not isinstance(data, dict) or data.get("library") != LIBRARY or data.get("format") != MANIFEST_FORMAT:
            return None, f"it is not a manifest of {LIBRARY} of format {MANIFEST_FORMAT}"
        files = data.get("files")
        if not isinstance(files, list) or not all(isinstance(f, str) and _relative_ok(f) for f in files):
            return None, "its field 'files' must be a list of relative paths inside the folder"
        return data, None

    def owned(self) -> bool:
        return self.manifest() is not None

    def files(self) -> list[str]:
        """The files the manifest lists; never the lock or the manifest itself (a manifest that lists them is
        not followed there: the lock a run holds is not the run's output)."""
        data = self.manifest()
        return [f for f in data["files"] if f not in (LOCK_FILE, MANIFEST)] if data else []

    def claim(self, *files: str) -> None:
        """Add ``files`` (paths relative to the folder) to the manifest, before writing them."""
        for f in files:
            if not _relative_ok(f):
                raise ValueError(f"claim: {f!r} is not a plain path inside the run folder")
        listed = self.files()
        new = listed + [f for f in dict.fromkeys(files) if f not in listed]
        if new != listed or not self.manifest_path.is_file():
            write_text(self.manifest_path, json.dumps({"library": LIBRARY, "format": MANIFEST_FORMAT,
                                                        "files": new}, indent=1) + "\n")

    # -------------------------------------------------------------- contents
    def _tree(self) -> list[str]:
        """Every file and every link under the folder (relative, sorted); links to folders are not entered."""
        if not self.path.is_dir():
            return []
        out = []
        for root, dirs, names in os.walk(self.path):
            rel = Path(root).relative_to(self.path)
            out += [(rel / n).as_posix() for n in names]
            out += [(rel / d).as_posix() for d in dirs if os.path.islink(os.path.join(root, d))]
        return sorted(out)

    def entries(self) -> list[str]:
        """Every file under the folder (relative, sorted), the lock and the manifest left out."""
        return [e for e in self._tree() if e not in (LOCK_FILE, MANIFEST)]

    def foreign(self) -> list[str]:
        """Files in the folder that the manifest does not list (a temp file of a listed file is not foreign)."""
        listed = set(self.files())
        out = []
        for e in self.entries():
            if e in listed:
                continue
            parent, _, name = e.rpartition("/")
            m = TEMP_NAME.match(name)
            if m and (f"{parent}/{m.group('name')}" if parent else m.group("name")) in listed:
                continue
            out.append(e)
        return out

    def links(self) -> list[str]:
        """Symbolic links anywhere under the folder (relative): a run never writes or deletes through one."""
        return [e for e in self._tree() if (self.path / e).is_symlink()]

    def _inside(self, f: str) -> bool:
        """``f`` lies in the folder through real folders only (no link on the way)."""
        p = self.path
        for part in f.split("/")[:-1]:
            p = p / part
            if p.is_symlink():
                return False
        return True

    def has_run(self) -> bool:
        """A polarprune run is here: the manifest lists a checkpoint or a report that exists."""
        return any((self.path / f).is_file() for f in self.files()
                   if f.rpartition("/")[2] in ("checkpoint.pt", "report.json"))

    def clean_temps(self) -> list[Path]:
        """Remove the temporary files that an interrupted write of a listed file left."""
        by_dir: dict[str, list[str]] = {}
        for f in self.files() + [MANIFEST]:
            parent, _, name = f.rpartition("/")
            by_dir.setdefault(parent, []).append(name)
        removed = []
        for parent, names in by_dir.items():
            if parent and not self._inside(parent + "/x"):
                continue
            removed += remove_stale_temps(self.path / parent if parent else self.path, names)
        return removed

    def clear(self) -> list[str]:
        """Remove the files the manifest lists (only those), and the folders they leave empty."""
        removed = []
        self.clean_temps()
        for f in self.files():
            p = self.path / f
            if self._inside(f) and (p.is_file() or p.is_symlink()):
                p.unlink()   # a link itself, never what it points to
                removed.append(f)
        for f in sorted(self.files(), key=lambda s: -s.count("/")):
            parent = (self.path / f).parent
            while parent != self.path and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        write_text(self.manifest_path, json.dumps({"library": LIBRARY, "format": MANIFEST_FORMAT, "files": []},
                                                  indent=1) + "\n")
        return removed

    def refuse_unlisted(self, names) -> None:
        """RunFolderError when a file about to be written (``names``, relative) exists and the manifest does not
        list it: a user's own file there (their ``baseline.pt``, ``model.pt2``) is never replaced."""
        listed = set(self.files())
        mine = [n for n in names if n not in listed and (self.path / n).exists()]
        if mine:
            raise RunFolderError(f"out: {self.path / mine[0]} is not a file polarprune wrote (the manifest does "
                                 "not list it); it is never replaced: move it, or choose another --out")

    # -------------------------------------------------------------- the command line's policy
    def prepare(self, *, resume: bool, overwrite: bool, planned: list[str]) -> str | None:
        """Apply the rules of a new run (call while holding :func:`locked`); returns a note for the user
        (``--resume`` with nothing to resume) or None. RunFolderError when the folder cannot be used."""
        if resume and overwrite:
            raise RunFolderError("resume and overwrite exclude each other: --resume continues the run in --out, "
                                 "--overwrite starts it over")
        _refuse_foreign(self.path)
        self.refuse_unlisted(planned)
        links = self.links()
        if links:
            raise RunFolderError(f"out: {self.path} holds symbolic links ({', '.join(links[:3])}); polarprune "
                                 "writes and removes only real files inside its folder: choose a new or empty --out")
        note = None
        if self.has_run() and not (resume or overwrite):
            raise RunFolderError(f"{self.path} already holds a run; pass --resume to continue it, --overwrite to "
                                 "start over, or choose another --out")
        if overwrite:
            self.clear()
        else:
            self.clean_temps()
        if resume and not (self.path / "checkpoint.pt").is_file():
            note = (f"--resume: {self.path} has no checkpoint yet (no epoch has finished); starting from the "
                    "first epoch")
        self.claim(*planned)
        return note


def _relative_ok(f: str) -> bool:
    parts = f.split("/")
    return bool(f) and not f.startswith("/") and "\\" not in f and all(p not in ("", ".", "..") for p in parts)
