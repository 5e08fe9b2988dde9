"""What the benchmark suites share: model settings per device, the three ways to gate, the seeded gate rule.

Settings (batch sizes, input sizes, dtypes) are stated here once and copied
into every result, so a table always says what it measured.
"""
from __future__ import annotations

import contextlib
import math
import platform
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import polarprune_cuda as pp

#: the implementations behind the ``polarprune::*`` ops that the kernel benchmarks compare (bench_kernels.py):
#: the reference eagerly, the reference under torch.compile, Triton, the CUDA extension; all called with the
#: reference signatures
PROVIDERS = ("eager", "compile", "triton", "cuda")
_COMPILED: dict = {}


def provider_op(provider: str, op: str, device: torch.device):
    """(``op``'s implementation for ``provider`` on ``device``, None), or (None, why it cannot be timed)."""
    from polarprune_cuda.ops import backends, reference

    if provider == "eager":
        return getattr(reference, op), None
    if provider == "compile":
        if op not in _COMPILED:
            _COMPILED[op] = torch.compile(getattr(reference, op), dynamic=False)
        return _COMPILED[op], None
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    if device.type != "cuda":
        return None, f"{provider} is timed on a GPU only (the CPU Triton interpreter is for testing)"
    b = backends.get_backend(provider)
    if not b.available:
        return None, f"{provider} backend unavailable: {b.reason}"
    return b.ops[op], None


MODELS = ("resnet56", "resnet50")
MACS_REMOVED = (0.3, 0.5, 0.7)
NUM_CLASSES = 10


@dataclass(frozen=True)
class Setting:
    model: str
    batch: int
    size: int               # input height = width
    dtype: str              # "float32", or the autocast dtype on a GPU ("bfloat16")
    channels_last: bool
    round_to: int           # kept widths of the extracted models are multiples of this

    def to_dict(self) -> dict:
        return asdict(self)


def settings(device: torch.device, tiny: bool = False) -> dict[str, Setting]:
    """The model settings for ``device``; ``tiny`` shrinks everything for the CI smoke run."""
    if tiny:
        return {"resnet56": Setting("resnet56", 2, 16, "float32", False, 4),
                "resnet50": Setting("resnet50", 2, 32, "float32", False, 8)}
    if device.type == "cuda":
        return {"resnet56": Setting("resnet56", 256, 32, "bfloat16", True, 8),
                "resnet50": Setting("resnet50", 256, 224, "bfloat16", True, 8)}
    # CPU: channels_last where oneDNN runs it without layout reorders (ResNet-50); ResNet-56's narrow layers
    # (16-64 channels, widths rounded to 4) run faster in NCHW
    return {"resnet56": Setting("resnet56", 32, 32, "float32", False, 4),
            "resnet50": Setting("resnet50", 8, 112, "float32", True, 8)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"CPU {name or platform.processor() or platform.machine()}"


def device_slug(name: str) -> str:
    """A file-name-safe form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def build(name: str) -> nn.Module:
    if name == "resnet56":
        return pp.resnet56(num_classes=NUM_CLASSES)
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50(num_classes=NUM_CLASSES)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def batch(setting: Setting, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(setting.batch, 3, setting.size, setting.size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (setting.batch,), generator=g)
    x = x.to(device)
    if setting.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device)


def place(model: nn.Module, setting: Setting, device: torch.device) -> nn.Module:
    model = model.to(device)
    if setting.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def autocast(setting: Setting, device: torch.device):
    if setting.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, setting.dtype))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: bytes read to push earlier data out of the L2 cache before a timed round (H100: 50 MB, H200: 60 MB of L2)
FLUSH_BYTES = 256 * 2 ** 20


class L2Flush:
    """``flush()`` reads a buffer larger than the L2 cache and waits for it: untimed set-up before a round.

    It only reads (a sum into one preallocated element): a flush that writes (``zero_()``) leaves tens of MB
    of dirty lines, written back to memory inside the next timed call, which adds the same microseconds to
    every op and to the copy it is compared with. On a CPU it does nothing.
    """

    def __init__(self, device: torch.device, nbytes: int = FLUSH_BYTES):
        self.device = device
        self.buffer = torch.ones(nbytes // 4, dtype=torch.float32, device=device) if device.type == "cuda" else None
        self.out = torch.empty((), dtype=torch.float32, device=device)

    def __call__(self) -> None:
        if self.buffer is not None:
            torch.sum(self.buffer, 0, out=self.out)
            sync(self.device)


class RoundTimer:
    """``run = RoundTimer(fn, calls, device)``: one round = ``calls`` back-to-back calls of ``fn`` and one
    synchronisation (pytest-benchmark's wall clock times it), with the GPU time of the same calls between two
    CUDA events beside it. ``info()`` gives both per call: ``wall_us`` (median round / calls, what the host
    sees, launch gaps included) and ``gpu_us`` (events, the device's own time)."""

    def __init__(self, fn, calls: int, device: torch.device):
        self.fn, self.calls, self.device = fn, calls, device
        self.wall: list[float] = []
        self.gpu: list[float] = []

    def __call__(self) -> None:
        import time

        t0 = time.perf_counter()
        if self.device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        for _ in range(self.calls):
            self.fn()
        if self.device.type == "cuda":
            b.record()
            b.synchronize()
            self.gpu.append(a.elapsed_time(b) * 1e3 / self.calls)
        self.wall.append((time.perf_counter() - t0) * 1e6 / self.calls)

    def info(self, skip: int = 0) -> dict:
        import statistics

        wall, gpu = self.wall[skip:] or self.wall, self.gpu[skip:] or self.gpu
        return {"calls_per_round": self.calls, "wall_us": statistics.median(wall) if wall else None,
                "gpu_us": statistics.median(gpu) if gpu else None}


# ----------------------------------------------------------------------------- gating, three ways

class NaiveGate(nn.Module):
    """The naive way: a straight-through hard gate multiplied into the activation, ``y = x * g[c]`` (eager)."""

    def __init__(self, channels: int):
        super().__init__()
        self.scores = nn.Parameter(torch.ones(channels))

    def gate(self) -> torch.Tensor:
        s = self.scores
        return (s > 0).to(s.dtype) + (s - s.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate().to(x.dtype).view(1, -1, 1, 1)


def naive_gated(model: nn.Module) -> nn.Module:
    """``model`` with a :class:`NaiveGate` after every BatchNorm2d (in place; returns it)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, child_name, nn.Sequential(child, NaiveGate(child.num_features)))
    return model


def naive_penalty(model: nn.Module, target_sparsity: float = 0.5) -> torch.Tensor:
    """The same bimodal penalty over channel density, written the straightforward way (autograd, eager)."""
    s = torch.cat([m.scores for m in model.modules() if isinstance(m, NaiveGate)])
    p = torch.sigmoid(s)
    return 20.0 * (p.mean() - (1 - target_sparsity)) ** 2 + 0.1 * (4 * p * (1 - p)).mean()


def training_step(variant: str, setting: Setting, device: torch.device):
    """``(step, model)``: one SGD step (forward, loss, backward, update) of the chosen variant on a fixed batch.

    variant: ``unpruned`` (plain model), ``naive`` (:func:`naive_gated` +
    :func:`naive_penalty`), ``polarprune`` (attach_gates: gates folded into
    the BatchNorm affines, one gate-bank op per pass, MACs penalty fused
    into it).
    """
    torch.manual_seed(0)
    model = build(setting.model)
    x, y = batch(setting, device)
    penalty = None
    if variant == "naive":
        naive_gated(model)
        penalty = lambda: naive_penalty(model)   # noqa: E731
    elif variant == "polarprune":
        pp.attach_gates(model, torch.randn(1, 3, setting.size, setting.size))
        loss_fn = pp.PolarizationLoss(0.5, cost="macs")
        penalty = lambda: loss_fn(model)   # noqa: E731
    elif variant != "unpruned":
        raise ValueError(f"variant must be unpruned, naive or polarprune, got {variant!r}")
    model = place(model, setting, device).train()
    if variant == "polarprune":
        loss_fn.arm(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(setting, device):
            loss = F.cross_entropy(model(x), y)
            if penalty is not None:
                loss = loss + penalty()
        loss.backward()
        opt.step()

    return step, model


# ----------------------------------------------------------------------------- the seeded gate rule

def close_for_macs(model: nn.Module, macs_removed: float, seed: int = 0) -> dict:
    """Set the gates of an ``attach_gates`` model so that about ``macs_removed`` of its MACs go.

    The rule is fixed and seeded, so runs are comparable: every group keeps
    the same fraction of its channels (rounded to the model's ``round_to``,
    at least ``min_channels``), the channels chosen by a seeded permutation;
    the fraction is found by bisection on the exact MACs of the result.
    Returns the predicted counts.
    """
    if not 0 < macs_removed < 1:
        raise ValueError(f"macs_removed must be in (0, 1), got {macs_removed!r}")
    bank = pp.find_bank(model)
    record = bank.surgery
    g = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(n, generator=g) for n in bank.sizes]
    dense_macs = record.dense["macs"]

    def apply(frac: float) -> dict:
        scores = []
        for n, order in zip(bank.sizes, orders):
            s = torch.full((n,), -1.0)
            s[order[: max(1, math.floor(frac * n + 0.5))]] = 1.0
            scores.append(s)
        with torch.no_grad():
            bank.scores.copy_(torch.cat(scores).to(bank.scores))
        return pp.predicted_count(model)

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if 1 - apply(mid)["macs"] / dense_macs > macs_removed:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda f: abs(1 - apply(f)["macs"] / dense_macs - macs_removed))
    return apply(best)


def extracted(setting: Setting, macs_removed: float, seed: int = 0) -> tuple[nn.Module, dict, dict]:
    """``(model, dense counts, pruned counts)``: the extracted model with ``macs_removed`` of the MACs gone."""
    torch.manual_seed(seed)
    model = build(setting.model)
    example = torch.randn(1, 3, setting.size, setting.size)
    pp.attach_gates(model, example, round_to=setting.round_to, min_channels=setting.round_to)
    dense = dict(pp.find_bank(model).surgery.dense)
    close_for_macs(model, macs_removed, seed)
    small = pp.extract(model.eval(), example)
    return small, dense, pp.count(small, example)


# ----------------------------------------------------------------------------- interleaved timing

def interleaved(fns: dict, device: torch.device):
    """``(round_fn, times)``: one call of ``round_fn`` runs every function once, in a rotating order, timing each.

    ``times[name]`` collects seconds per call. Interleaving makes the ratios
    immune to the slow drifts of a shared machine that sequential benchmarks
    absorb into one variant only.
    """
    import time

    names = list(fns)
    times = {n: [] for n in names}
    state = {"round": 0}

    def round_fn():
        k = state["round"] % len(names)
        state["round"] += 1
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[n]()
            sync(device)
            times[n].append(time.perf_counter() - t0)

    return round_fn, times


def time_stats(seconds: list[float]) -> dict:
    import statistics

    q = statistics.quantiles(seconds, n=4) if len(seconds) >= 2 else [seconds[0]] * 3
    return {"median_ms": statistics.median(seconds) * 1e3, "min_ms": min(seconds) * 1e3,
            "iqr_ms": (q[2] - q[0]) * 1e3, "rounds": len(seconds)}
