"""Image folder against in-memory tensors: the loader's images/s and a ResNet-20 training step fed by each.

    python benchmarks/experiments/folder_throughput.py --write /tmp/fmnist-png [--data-dir FASHION_MNIST_IDX]
    python benchmarks/experiments/folder_throughput.py --folder /tmp/fmnist-png

The files are read once first, so the measurement sees the page cache every epoch after the first sees.
``--write`` turns the Fashion-MNIST IDX files into an ImageFolder of PNGs (train/<class>/, val/<class>/: 60,000 +
10,000 files). The measurement, on one machine, one configuration after the other: the loader alone (images/s
over ``--batches`` batches of 128, after one batch of warm-up) for the in-memory path and the folder with 0, 1
and 2 workers; then ``--steps`` ResNet-20 training steps (SGD, batch 128) fed by the in-memory batches and by the
folder's with each number of workers, the same number of steps each, in turn for ``--rounds`` rounds; the slowdown of a
training epoch is the ratio of the medians. Results: benchmarks/results/folder-throughput-<stem>.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[2]

import _record  # noqa: E402
from polarprune_cuda.models import build_model  # noqa: E402
from polarprune_cuda.train import data as data_mod  # noqa: E402
from polarprune_cuda.train.folder import FolderData  # noqa: E402


def write_folder(out: Path, data_dir) -> None:
    """Fashion-MNIST's IDX files as PNGs (the raw 8-bit images, one folder per class)."""
    from PIL import Image

    folder = data_mod.fashion_mnist_dirs(data_dir)
    files = {}
    for d in folder:
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte"):
            found = data_mod._find_idx(d, stem)
            if found is not None:
                files[stem] = found
        if len(files) == 4:
            break
    if len(files) != 4:
        raise SystemExit("Fashion-MNIST IDX files not found (--data-dir)")
    for split, images, labels in (("train", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                                  ("val", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):
        x, y = data_mod._read_idx(files[images]), data_mod._read_idx(files[labels])
        for c in range(10):
            (out / split / f"{c}").mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(x, y)):
            Image.fromarray(img, "L").save(out / split / f"{label}" / f"{i:05d}.png")
        print(f"{split}: {len(y)} images", flush=True)


def loader_rate(batches, n: int) -> float:
    it = iter(batches)
    next(it)                                           # warm-up: workers started, first batch decoded
    t0 = time.perf_counter()
    count = 0
    for _ in range(n):
        x = next(it)[0]
        count += len(x)
    return count / (time.perf_counter() - t0)


def train_steps(model, opt, batches, n: int) -> float:
    """Seconds of ``n`` training steps fed by ``batches`` (loading included)."""
    it = iter(batches)
    t0 = time.perf_counter()
    for _ in range(n):
        x, y = next(it)[:2]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", type=Path, default=None, help="write the PNG folder here, then stop")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (default: the Debian package)")
    p.add_argument("--folder", type=Path, default=None, help="the PNG folder to measure")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--stem", default="fashion-mnist")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.write is not None:
        write_folder(args.write, args.data_dir)
        return None
    if args.folder is None:
        p.error("--folder or --write")
    mem = data_mod.load_dataset("fashion-mnist", args.data_dir)
    t0 = time.perf_counter()
    files = [f for f in sorted(args.folder.rglob("*.png"))]
    for f in files:   # the page cache, as every epoch after the first finds it
        f.read_bytes()
    warm = time.perf_counter() - t0
    bs = 128

    def mem_batches(epoch):
        return data_mod.batches(mem.train_x, mem.train_y, bs, seed=0, epoch=epoch, pad=mem.pad, flip=mem.flip)

    rows = [{"path": "in-memory", "images_per_s": loader_rate(mem_batches(0), args.batches)}]
    folders = {}
    for w in args.workers:
        folders[w] = FolderData(args.folder, workers=w, image_size=28)
        rows.append({"path": f"folder, {w} workers",
                     "images_per_s": loader_rate(folders[w].train_batches(bs, 0, 0), args.batches)})
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    times = {"in-memory": [], **{f"folder, {w} workers": [] for w in args.workers}}
    for r in range(args.rounds):   # in turn: in memory, then the folder with each number of workers
        times["in-memory"].append(train_steps(model, opt, mem_batches(r + 1), args.steps))
        for w in args.workers:
            times[f"folder, {w} workers"].append(
                train_steps(model, opt, folders[w].train_batches(bs, 0, r + 1), args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    slowdown = {k: v / med["in-memory"] for k, v in med.items() if k != "in-memory"}
    lines = ["| path | loader alone (images/s) |", "|---|---:|"]
    lines += [f"| {r['path']} | {r['images_per_s']:,.0f} |" for r in rows]
    lines += ["", f"| training steps fed by | images/s (median of {args.rounds} rounds of {args.steps} steps) | "
              f"a training epoch |", "|---|---:|---|"]
    lines += [f"| {k} | {bs * args.steps / v:,.0f} |" + (f" {slowdown[k]:.2f}x the in-memory epoch's time "
              f"({(slowdown[k] - 1) * 100:+.1f}%) |" if k in slowdown else " |") for k, v in med.items()]
    cmd = _record.command("folder_throughput.py", argv)
    text = (f"# Image folder against in-memory tensors: Fashion-MNIST (60,000 PNGs) and ResNet-20\n\n"
            f"Command: `{cmd}`  \nCPU, {torch.get_num_threads()} threads; batch {bs}; the folder at 28x28 (random "
            f"resized crop and flip, decoded from PNG), the in-memory path with its pad-crop and flip. "
            f"The {len(files):,} files read once before (the page cache, as every epoch after the first finds it: "
            f"{warm:.1f} s). One configuration after the other on one machine.\n\n" + "\n".join(lines) + "\n")
    _record.write(args.out, f"folder-throughput-{args.stem}", {"command": cmd, "loader": rows, "steps": times,
                                                               "slowdown": slowdown}, text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
