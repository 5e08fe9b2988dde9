"""``--dataset folder``: your own images in torchvision's ImageFolder layout, streamed from disk.

    DIR/train/<class>/<image>      the training images, one folder per class
    DIR/val/<class>/<image>        the evaluation images (``DIR/test/`` is read where ``val/`` is missing)

Images are decoded by a :class:`torch.utils.data.DataLoader` (``--workers`` processes, pinned memory on a GPU),
one channel where the first training image is grey, else RGB. Training: a random resized crop to
``--image-size`` (the first image's size by default; scale 0.25 to 1) and a horizontal flip; evaluation: a resize
to ``image_size / 0.875`` and a center crop. Normalisation: ``--normalize MEAN...,STD...`` or computed once from
up to :data:`STATS_IMAGES` training images; it travels with the model (:class:`Preprocessing`, in the report and
the spec of the saved model, ``model/spec.json``).

The epoch's order is the in-memory sets' (a permutation seeded by the seed and the epoch, the same global
batches under torchrun, each rank taking its slice), and every image's augmentation is drawn from a generator
seeded by the seed, the epoch and the image's index: a run is the same with any number of workers and resumes
exactly at an epoch boundary. (torchvision's transforms draw from the process's global generator, which
would have to be forked for every image; the crop and flip here take their own generator and run in PIL.
The loader's rate: benchmarks/results/folder-throughput-fashion-mnist.md.) An image that cannot be read
stops the run with its path (:class:`~polarprune_cuda.errors.ImageReadError`); the checkpoint of the last
epoch stays.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from ..errors import DatasetNotFoundError, ImageReadError
from . import distributed as dist_mod

#: file name endings read as images (torchvision's ImageFolder list)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: training images the normalisation is computed from where it is not given
STATS_IMAGES = 512
#: the smallest fraction of the image a training crop covers
CROP_SCALE = (0.25, 1.0)


@dataclass
class Preprocessing:
    """What an input needs before the model sees it: resize to ``image_size / 0.875``, center crop to
    ``image_size``, ``channels`` (1: grey, 3: RGB), values in [0, 1], then ``(x - mean) / std`` per channel;
    ``classes[i]`` is the name of output ``i``."""

    mean: list
    std: list
    image_size: int
    channels: int
    classes: list

    def to_dict(self) -> dict:
        return asdict(self)


def _listing(root: Path, classes: list[str] | None) -> tuple[list[tuple[Path, int]], list[str]]:
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise DatasetNotFoundError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    else:
        extra = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in classes)
        if extra:
            raise ValueError(f"{root} has classes the training folder lacks: {', '.join(extra[:5])}")
    samples = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                samples.append((path, label))
    if not samples:
        raise DatasetNotFoundError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return samples, classes


def _open(path: Path, channels: int | None):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if channels is None:
                channels = 1 if im.mode in ("L", "I", "I;16", "F", "1") else 3
            return im.convert("L" if channels == 1 else "RGB"), channels
    except Exception as exc:   # noqa: BLE001 - whatever PIL raises, the path is what the user needs
        raise ImageReadError(f"image {path} cannot be read ({type(exc).__name__}: {exc}); remove or replace "
                             f"it and resume (--resume)") from None


def _tensor(image) -> Tensor:
    """A PIL image as a (C, H, W) float tensor of values in [0, 1]."""
    import numpy as np

    a = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
    a = a.unsqueeze(0) if a.dim() == 2 else a.permute(2, 0, 1)
    return a.float().div_(255.0)


def _crop_box(rng: random.Random, height: int, width: int) -> tuple[int, int, int, int]:
    """A random resized crop's box (top, left, h, w): area a fraction :data:`CROP_SCALE` of the image, aspect
    ratio 3/4 to 4/3 (torchvision's rule: ten tries, then the central crop)."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


class _Transform:
    """Training: a random resized crop to ``size`` and a horizontal flip, from the generator given; evaluation:
    the shorter side resized to ``size / 0.875``, then the central ``size`` x ``size``. The geometry in PIL
    (bilinear, antialiased when it shrinks), then ``(x - mean) / std`` where given."""

    def __init__(self, size: int, train: bool, mean=None, std=None):
        self.size, self.train = size, train
        self.mean = None if mean is None else torch.tensor(mean).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(-1, 1, 1)

    def __call__(self, image, rng: random.Random | None = None) -> Tensor:
        from PIL import Image

        width, height = image.size
        size = self.size
        if self.train:
            top, left, h, w = _crop_box(rng, height, width)
            image = image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            scale = round(size / 0.875) / min(height, width)
            w, h = max(size, round(width * scale)), max(size, round(height * scale))
            if (w, h) != (width, height):
                image = image.resize((w, h), Image.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
        x = _tensor(image)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x


class _Images(torch.utils.data.Dataset):
    """The images of one split, transformed; training images with their own seeded augmentation."""

    def __init__(self, samples, transform, channels: int, seed: int | None = None):
        self.samples, self.transform, self.channels, self.seed = samples, transform, channels, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        image, _ = _open(path, self.channels)
        if self.seed is None or not self.transform.train:
            return self.transform(image), label
        return self.transform(image, random.Random((self.seed * 100_003 + self.epoch) * 1_000_003 + i)), label


def _stats(train, size: int, channels: int) -> tuple[list, list]:
    """Per-channel mean and std of up to :data:`STATS_IMAGES` training images as evaluation sees them."""
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:STATS_IMAGES].tolist()
    images = _Images([train[i] for i in pick], _Transform(size, False), channels)
    x = torch.stack([images[i][0] for i in range(len(images))])
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def parse_normalize(text: str | None, channels: int) -> tuple[list, list] | None:
    """``"m1,...,s1,..."`` (one mean and one std per channel) as (mean, std); None for None."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"normalize must be comma-separated numbers (means, then stds), got {text!r}") from None
    if len(values) != 2 * channels or not all(math.isfinite(v) for v in values) or min(values[channels:]) <= 0:
        raise ValueError(f"normalize needs {channels} means and {channels} positive stds for {channels}-channel "
                         f"images, got {text!r}")
    return values[:channels], values[channels:]


class FolderData:
    """A data set read from an image folder (see the module's text); quacks like :class:`ImageData` where the
    trainer needs it: ``train_y``/``test_y`` (the labels), ``num_classes``, ``in_channels``, ``image_size``,
    :meth:`example_input`, :meth:`train_batches`, :meth:`test_batches`."""

    name = "folder"
    pad, flip = 0, False

    def __init__(self, root, image_size: int | None = None, workers: int = 0, normalize: str | None = None,
                 max_train: int | None = None, max_test: int | None = None, pin_memory: bool = False):
        root = Path(root)
        train_dir = root / "train"
        test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
        if not train_dir.is_dir() or test_dir is None:
            raise DatasetNotFoundError(
                f"{root} is not an image folder: it needs {root}/train/<class>/<image> and {root}/val/<class>/<image> "
                f"(or test/), torchvision's ImageFolder layout")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {workers!r}")
        train, classes = _listing(train_dir, None)
        test, _ = _listing(test_dir, classes)
        if max_train:
            train = [train[i] for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
                     [:max_train].sort().values.tolist()]
        if max_test:
            test = [test[i] for i in torch.randperm(len(test), generator=torch.Generator().manual_seed(1))
                    [:max_test].sort().values.tolist()]
        first, channels = _open(train[0][0], None)
        size = image_size or max(first.size)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"image-size must be a positive int, got {image_size!r}")
        self.root, self.workers, self.pin_memory = root, workers, pin_memory
        self.source = str(root)
        self.num_classes = len(classes)
        self.train_y = torch.tensor([label for _, label in train], dtype=torch.long)
        self.test_y = torch.tensor([label for _, label in test], dtype=torch.long)
        given = parse_normalize(normalize, channels)
        mean, std = given if given is not None else _stats(train, size, channels)
        self.preprocessing = Preprocessing(mean, std, size, channels, classes).to_dict()
        self._train = _Images(train, _Transform(size, True, mean, std), channels, seed=0)
        self._test = _Images(test, _Transform(size, False, mean, std), channels)

    # ----------------------------------------------------------------- what the trainer reads

    @property
    def in_channels(self) -> int:
        return self.preprocessing["channels"]

    @property
    def image_size(self) -> int:
        return self.preprocessing["image_size"]

    def example_input(self, batch: int = 1) -> Tensor:
        """The first ``batch`` training images as evaluation sees them."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        n = len(self._train)
        plain = _Images(self._train.samples, self._test.transform, self.in_channels)
        return torch.stack([plain[i % n][0] for i in range(batch)])

    def _loader(self, dataset, batch_sampler):
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=self.workers,
                                           pin_memory=self.pin_memory)

    def train_batches(self, batch_size: int, seed: int, epoch: int, info: dist_mod.DistInfo = dist_mod.SINGLE
                      ) -> Iterator[tuple[Tensor | None, Tensor | None, int]]:
        """The epoch's global batches, the order and the augmentation seeded by (``seed``, ``epoch``): for each,
        ``(images, labels, global batch size)`` of this rank's slice of it (the slice
        :func:`~polarprune_cuda.train.distributed.shard` gives; ``(None, None, n)`` where a batch has fewer
        images than ranks and every rank skips it). A rank decodes only its own slice."""
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(self._train), generator=gen).tolist()
        self._train.seed, self._train.epoch = seed, epoch
        whole = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        parts = []
        for b in whole:
            part = dist_mod.shard(len(b), info)
            parts.append(None if part is None else b[part])
        loader = iter(self._loader(self._train, [p for p in parts if p is not None]))
        for b, p in zip(whole, parts):
            if p is None:
                yield None, None, len(b)
            else:
                x, y = next(loader)
                yield x, y, len(b)

    def test_batches(self, batch_size: int = 256, info: dist_mod.DistInfo = dist_mod.SINGLE):
        """The evaluation images in order (under torchrun: this rank's contiguous part)."""
        idx = torch.tensor_split(torch.arange(len(self._test)), info.world_size)[info.rank].tolist()
        return self._loader(self._test, [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)])
