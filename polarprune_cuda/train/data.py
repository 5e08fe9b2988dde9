"""Data sets that work without network access, held in memory as tensors.

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes),
  a fixed stratified 80/20 split. The embedded default.
* ``fashion-mnist``: the four IDX files (optionally gzipped), from
  ``--data-dir`` or the Debian package ``dataset-fashion-mnist``.
* ``cifar10`` / ``cifar100``: the python-pickle batches in torchvision's layout
  (``cifar-10-batches-py/``, ``cifar-100-python/``) under ``--data-dir``.
  Nothing is downloaded.
* ``folder``: your own images in torchvision's ImageFolder layout under ``--data-dir``, streamed from disk
  (:mod:`~polarprune_cuda.train.folder`).

Batches come from :func:`batches`: a seeded permutation per epoch and, for
training, a seeded augmentation (random crop with zero padding, horizontal flip
where the data set allows it), so a run is reproducible and resumable at
epoch boundaries.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from ..errors import DatasetNotFoundError
from . import distributed as dist_mod

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "folder")
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/share/dataset-fashion-mnist")




@dataclass
class ImageData:
    name: str
    train_x: Tensor        # (N, C, H, W) float32, normalised
    train_y: Tensor        # (N,) int64
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    pad: int               # random-crop padding for augmentation (0: none)
    flip: bool             # random horizontal flips
    source: str            # where the files came from
    #: what an input needs before the model sees it (mean, std per channel of values in [0, 1]; image_size,
    #: channels, classes): train.folder.Preprocessing's fields
    preprocessing: dict | None = None

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]

    def example_input(self, batch: int = 1) -> Tensor:
        """The first ``batch`` training images (repeated when the training set is smaller)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        x = self.train_x[:batch]
        if len(x) < batch:
            x = x.repeat(-(-batch // len(x)), *([1] * (x.dim() - 1)))[:batch]
        return x.clone()


def _normalise(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor, dict]:
    """Both splits normalised with the training split's per-channel statistics, and those statistics."""
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    stats = {"mean": [round(float(v), 6) for v in mean.flatten()],
             "std": [round(float(v), 6) for v in std.flatten()]}
    return (train - mean) / std, (test - mean) / std, stats


def _prepared(data: ImageData, stats: dict) -> ImageData:
    """``data`` with its preprocessing recorded (classes named by their index)."""
    data.preprocessing = {**stats, "image_size": data.image_size, "channels": data.in_channels,
                          "classes": [str(i) for i in range(data.num_classes)]}
    return data


def _check_limits(max_train: int | None, max_test: int | None) -> None:
    for name, v in (("max_train", max_train), ("max_test", max_test)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name.replace('_', '-')} must be a positive int (or left out for all images), "
                             f"got {v!r}")


def _limit(data: ImageData, max_train: int | None, max_test: int | None) -> ImageData:
    _check_limits(max_train, max_test)
    if max_train:
        data.train_x, data.train_y = data.train_x[:max_train], data.train_y[:max_train]
    if max_test:
        data.test_x, data.test_y = data.test_x[:max_test], data.test_y[:max_test]
    return data


def load_digits() -> ImageData:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0,
                                           stratify=bunch.target)
    train_x, test_x, stats = _normalise(images[idx_train], images[idx_test])
    return _prepared(ImageData("digits", train_x, labels[idx_train], test_x, labels[idx_test], 10, pad=1,
                               flip=False, source="scikit-learn (bundled)"), stats)


#: the largest IDX body read (bytes): Fashion-MNIST's training images are 47 MB; a small gzip file must not
#: expand into memory without bound
IDX_MAX_BYTES = 1 << 30


def _read_idx(path: Path, ndim_expected: int | None = None) -> np.ndarray:
    """An unsigned-byte IDX file (optionally gzipped), checked: magic number, type, number of dimensions, and a
    body of exactly the declared size, which is read only when it is at most :data:`IDX_MAX_BYTES`."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise ValueError(f"{path} is not an IDX file (bad magic number)")
            dtype_code, ndim = head[2], head[3]
            if dtype_code != 0x08:
                raise ValueError(f"{path}: only unsigned-byte IDX files are supported, got type 0x{dtype_code:02x}")
            if ndim_expected is not None and ndim != ndim_expected:
                raise ValueError(f"{path}: expected {ndim_expected} dimensions "
                                 f"({'labels' if ndim_expected == 1 else 'images'}), the header says {ndim}")
            raw = f.read(4 * ndim)
            if len(raw) < 4 * ndim:
                raise ValueError(f"{path}: the header is cut short ({len(raw) + 4} of {4 + 4 * ndim} bytes)")
            dims = struct.unpack(f">{ndim}I", raw)
            size = int(np.prod(dims, dtype=np.int64)) if dims else 1
            if size > IDX_MAX_BYTES:
                raise ValueError(f"{path}: the header declares {size:,} values (shape {dims}), more than an IDX "
                                 f"data set here may hold ({IDX_MAX_BYTES:,})")
            data = f.read(size + 1)
    except ValueError:
        raise
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path} is not an IDX file ({exc})") from exc
    if len(data) != size:
        raise ValueError(f"{path}: expected {size} values for shape {dims}, found "
                         f"{'more' if len(data) > size else len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _check_fashion(files, arrays) -> None:
    """Images (n, 28, 28) with n >= 1, labels (n,) in [0, 9], as many labels as images: else the file named."""
    for images, labels, fi, fl in ((arrays[0], arrays[1], files[0], files[1]), (arrays[2], arrays[3], files[2],
                                                                                 files[3])):
        if images.shape[0] == 0 or images.shape[1:] != (28, 28):
            raise ValueError(f"{fi}: Fashion-MNIST images are (n >= 1, 28, 28), the file holds {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{fl}: {labels.shape[0]} labels for the {images.shape[0]} images of {fi.name}")
        if labels.size and int(labels.max()) > 9:
            raise ValueError(f"{fl}: label {int(labels.max())} is not a Fashion-MNIST class (0 to 9)")


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    """Folders searched for Fashion-MNIST, in order."""
    if data_dir:   # an explicit folder is the only place looked in
        return [Path(data_dir), Path(data_dir) / "fashion-mnist", Path(data_dir) / "FashionMNIST" / "raw"]
    dirs = []
    env = os.environ.get("POLARPRUNE_DATA")
    if env:
        dirs += [Path(env) / "fashion-mnist", Path(env)]
    dirs += [Path(d) for d in FASHION_MNIST_DIRS]
    return dirs


def load_fashion_mnist(data_dir=None) -> ImageData:
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    searched = fashion_mnist_dirs(data_dir)
    for folder in searched:
        files = [_find_idx(folder, s) for s in stems]
        if all(files):
            arrays = [_read_idx(f, 3 if i % 2 == 0 else 1) for i, f in enumerate(files)]
            _check_fashion(files, arrays)
            train = torch.from_numpy(arrays[0].astype(np.float32) / 255.0).unsqueeze(1)
            test = torch.from_numpy(arrays[2].astype(np.float32) / 255.0).unsqueeze(1)
            train_x, test_x, stats = _normalise(train, test)
            return _prepared(ImageData("fashion-mnist", train_x, torch.from_numpy(arrays[1].astype(np.int64)),
                                       test_x, torch.from_numpy(arrays[3].astype(np.int64)), 10, pad=2, flip=True,
                                       source=str(folder)), stats)
    raise DatasetNotFoundError(
        "Fashion-MNIST not found. Looked for train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] in: " + ", ".join(map(str, searched))
        + ". Get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four IDX files "
        "from the Fashion-MNIST release in a folder and pass --data-dir FOLDER.")


#: what a CIFAR python batch may name when it is unpickled: numpy's array, scalar and dtype reconstruction (the
#: module as numpy 1 and numpy 2 write it) and ``_codecs.encode`` (bytes, as protocol 2 writes them from Python 3);
#: dicts, lists, ints and strings need no name
CIFAR_GLOBALS = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
                 for name in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype"),
                                                          ("_codecs", "encode")}   # bytes in protocol 2


class _DataUnpickler(pickle.Unpickler):
    """Unpickles a data file without running anything: a name outside :data:`CIFAR_GLOBALS` is refused (a
    pickle can name any callable, ``os.system`` included, and have it called)."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR_GLOBALS:
            raise ValueError(f"{self.path}: a CIFAR batch holds dicts, lists, bytes and numpy arrays, but this file "
                             f"names {module}.{name}; refused without running it (the file is not a CIFAR batch, "
                             f"or was tampered with)")
        if name in ("_reconstruct", "scalar"):
            try:
                from numpy._core import multiarray
            except ImportError:   # numpy 1
                from numpy.core import multiarray
            return getattr(multiarray, name)
        if module == "_codecs":
            import codecs

            return codecs.encode
        return getattr(np, name)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        try:
            return _DataUnpickler(f, path).load()
        except ValueError:
            raise
        except Exception as exc:   # noqa: BLE001 - a damaged file: say which
            raise ValueError(f"{path}: not a readable CIFAR batch ({type(exc).__name__}: {exc})") from None


def load_cifar(name: str, data_dir=None) -> ImageData:
    sub, train_files, test_file, key = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels"),
        "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels"),
    }[name]
    searched = []
    roots = [Path(data_dir)] if data_dir else []
    if not data_dir and os.environ.get("POLARPRUNE_DATA"):   # an explicit folder is the only place looked in
        roots.append(Path(os.environ["POLARPRUNE_DATA"]))
    for root in roots:
        folder = root / sub if (root / sub).is_dir() else root
        searched.append(str(folder))
        paths = [folder / f for f in train_files + [test_file]]
        if all(p.is_file() for p in paths):
            batches = [_unpickle(p) for p in paths]

            def stack(parts):
                x = np.concatenate([b[b"data"] for b in parts]).reshape(-1, 3, 32, 32)
                y = np.concatenate([np.asarray(b[key]) for b in parts])
                return torch.from_numpy(x.astype(np.float32) / 255.0), torch.from_numpy(y.astype(np.int64))

            train_x, train_y = stack(batches[:-1])
            test_x, test_y = stack(batches[-1:])
            train_x, test_x, stats = _normalise(train_x, test_x)
            return _prepared(ImageData(name, train_x, train_y, test_x, test_y, 10 if name == "cifar10" else 100,
                                       pad=4, flip=True, source=str(folder)), stats)
    where = ", ".join(searched) if searched else "nowhere (no --data-dir given and POLARPRUNE_DATA unset)"
    raise DatasetNotFoundError(
        f"{name.upper()} not found. Looked in: {where}. This project downloads nothing: put the python version "
        f"of the data set (the {sub}/ folder of the official archive, torchvision's layout) under a folder and "
        "pass --data-dir FOLDER.")


def load_dataset(name: str, data_dir=None, max_train: int | None = None, max_test: int | None = None,
                 **folder) -> ImageData:
    """Load a data set by name (see :data:`DATASETS`); an explicit ``data_dir`` must be a folder, and it is the
    only place looked in. ``folder``: :class:`~polarprune_cuda.train.folder.FolderData`'s options (image_size,
    workers, normalize, pin_memory) for the ``folder`` data set."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DatasetNotFoundError(f"data-dir {str(data_dir)!r} is not a folder (nothing is downloaded: give the "
                                   "folder that holds the data set's files)")
    if name == "folder":
        from .folder import FolderData

        if data_dir is None:
            raise ValueError("dataset folder reads --data-dir DIR (DIR/train/<class>/<image>, "
                             "DIR/val/<class>/<image>)")
        _check_limits(max_train, max_test)
        return FolderData(data_dir, max_train=max_train, max_test=max_test, **folder)
    if name == "digits":
        data = load_digits()
    elif name == "fashion-mnist":
        data = load_fashion_mnist(data_dir)
    elif name in ("cifar10", "cifar100"):
        data = load_cifar(name, data_dir)
    else:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    return _limit(data, max_train, max_test)


def augment(x: Tensor, gen: torch.Generator, pad: int, flip: bool) -> Tensor:
    """Random crop with zero padding and random horizontal flip, per sample, from ``gen``."""
    n, _, h, w = x.shape
    if pad:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h))            # (n, h)
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w))            # (n, w)
        idx_n = torch.arange(n).view(n, 1, 1)
        x = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        x = torch.where(mask.view(n, 1, 1, 1), x.flip(3), x)
    return x.contiguous()


def batches(x: Tensor, y: Tensor, batch_size: int, *, seed: int | None = None, epoch: int = 0,
            pad: int = 0, flip: bool = False, rank: int = 0, world_size: int = 1,
            drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches; with ``seed``: shuffled and augmented from a generator seeded by (seed, epoch).

    With ``world_size > 1`` each rank takes its own stride of the epoch's permutation.
    """
    n = x.shape[0]
    if seed is None:
        order = torch.arange(n)
        gen = None
    else:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen)
    order = order[rank::world_size]
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        xb = x[idx]
        if gen is not None and (pad or flip):
            xb = augment(xb, gen, pad, flip)
        yield _nchw(xb), y[idx]


def _nchw(x: Tensor) -> Tensor:
    """``x`` with the plain row-major strides. Indexing can give a one-channel batch the strides of channels_last
    (a size-1 dim's stride is free), and a convolution then runs its channels_last kernels all through the
    network; on a CPU some of those (oneDNN, odd channel counts such as an extracted network's) are not
    deterministic across threads, so a resumed run would not equal an uninterrupted one bit for bit."""
    want, step = [], 1
    for size in reversed(x.shape):
        want.append(step)
        step *= size
    if x.stride() == tuple(reversed(want)):
        return x
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def train_batches(data, batch_size: int, seed: int, epoch: int, info: dist_mod.DistInfo = dist_mod.SINGLE):
    """The epoch's training batches of ``data``: in memory, :func:`batches`' global batches ``(x, y)`` (each rank
    slices its part); a folder, ``(x, y, global batch size)`` of this rank's part (``info``: the rank's
    ``DistInfo``), decoded by its loader."""
    if isinstance(data, ImageData):
        return batches(data.train_x, data.train_y, batch_size, seed=seed, epoch=epoch, pad=data.pad, flip=data.flip)
    return data.train_batches(batch_size, seed, epoch, info)


def test_set(data, info: dist_mod.DistInfo = dist_mod.SINGLE) -> tuple:
    """What :func:`~polarprune_cuda.train.loop.evaluate` takes for ``data``'s test images: the tensors
    ``(x, y)``, or ``(this rank's batches, None)`` for a folder (``info``: the rank's ``DistInfo``)."""
    if isinstance(data, ImageData):
        return data.test_x, data.test_y
    return data.test_batches(256, info), None


def num_batches(n: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    per_rank = len(range(0, n, world_size)) if world_size > 1 else n
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)
