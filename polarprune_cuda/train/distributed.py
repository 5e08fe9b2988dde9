"""Multi-process training under ``torchrun``: process group, batch sharding, reductions, rank-0 writes.

``torchrun --nproc_per_node N -m polarprune_cuda prune ...`` starts N
processes; :func:`setup` reads torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``), joins the process group (``nccl`` on CUDA,
``gloo`` on CPU, or ``POLARPRUNE_DIST_BACKEND``) and picks this rank's
device. The trainer then wraps the model in ``DistributedDataParallel``: the
gate bank is an ordinary parameter, so its gradient is all-reduced with the
weights' and every rank holds identical gates.

Sharding: ``--batch-size`` is the global batch. Every rank draws the same
seeded, per-epoch permutation and augmentation (as a ``DistributedSampler``
with ``set_epoch`` would) and keeps its slice of each global batch, so a run
on N processes sees the same global batches as a run on one.

:func:`enable_sync_batchnorm` makes every BatchNorm2d (gated or not) compute
its training statistics over the global batch (two differentiable
all-reduces per layer; works with gloo on CPU and NCCL on GPU). With it, N
processes compute what one process computes on the global batch, up to float
rounding.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..gates.modules import GatedBatchNorm2d
from ..ops import functional


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, local rank and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> DistInfo:
    """Join the process group when launched by torchrun; returns this rank's :class:`DistInfo`.

    ``device`` is the requested device (``cpu``, ``cuda``, ``cuda:N``): under
    torchrun with CUDA every rank uses ``cuda:LOCAL_RANK``.
    """
    if not launched():
        return DistInfo(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device is cuda but no GPU is visible to this rank")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    backend = os.environ.get("POLARPRUNE_DIST_BACKEND") or ("nccl" if device.startswith("cuda") else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, device)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_sum(info: DistInfo, values: list[float], device) -> list[float]:
    """Sum each number over the ranks (identity on one process)."""
    if not info.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(info: DistInfo, obj):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_identical(info: DistInfo, t: Tensor, what: str) -> None:
    """Raise if ``t`` differs between ranks (compares max and min over ranks of a checksum)."""
    if not info.enabled:
        return
    s = t.detach().double()
    v = torch.stack([s.sum(), (s * torch.arange(1, s.numel() + 1, device=s.device, dtype=s.dtype)).sum()])
    hi, lo = v.clone(), v.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if not torch.equal(hi, lo):
        raise RuntimeError(f"{what} differ between ranks: the processes have diverged (a rank ran other steps, "
                           "or a parameter is not all-reduced)")


def shard(global_batch: int, info: DistInfo) -> slice | None:
    """This rank's slice of a global batch of ``global_batch`` samples (None: skip a batch smaller than the
    number of ranks, on every rank alike)."""
    if not info.enabled:
        return slice(0, global_batch)
    if global_batch < info.world_size:
        return None
    bounds = torch.tensor_split(torch.arange(global_batch), info.world_size)[info.rank]
    return slice(int(bounds[0]), int(bounds[-1]) + 1)


# ----------------------------------------------------------------------------- synchronised BatchNorm

def sync_batch_norm(x: Tensor, bn: nn.BatchNorm2d, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """Training-mode batch norm with statistics over every rank's batch (differentiable all-reduces).

    Two passes (mean, then the centred sum of squares), in float32 at least,
    so the variance is as accurate as the one-process kernel's. Updates the
    running statistics as BatchNorm2d does (unbiased variance).
    """
    import warnings

    with warnings.catch_warnings():   # the differentiable all_reduce; its successor is private API
        warnings.simplefilter("ignore", FutureWarning)
        from torch.distributed.nn.functional import all_reduce as _all_reduce

    def all_reduce(t):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return _all_reduce(t)

    C = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    count = torch.tensor([x.numel() // C], dtype=acc, device=x.device)
    first = all_reduce(torch.cat([xf.sum(dims), count]))
    n = first[C]
    mean = first[:C] / n
    shape = (1, C) + (1,) * (x.dim() - 2)
    centred = xf - mean.view(shape)
    var = all_reduce((centred * centred).sum(dims)) / n
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - m).add_(mean.detach().to(bn.running_mean.dtype), alpha=m)
            unbiased = var.detach() * n / (n - 1).clamp(min=1)   # no host read on the training path
            bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if weight is not None:
        y = y * weight.to(acc).view(shape)
    if bias is not None:
        y = y + bias.to(acc).view(shape)
    return y.to(x.dtype)


class SyncedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose training statistics cover the global batch (see :func:`sync_batch_norm`)."""

    def forward(self, x: Tensor) -> Tensor:
        if not _global_batch(self):
            return super().forward(x)
        self._check_input_dim(x)
        return sync_batch_norm(x, self, self.weight, self.bias)


def _global_batch(bn: nn.Module) -> bool:
    """Training under a process group of several ranks: the statistics must cover every rank's batch."""
    return bn.training and dist.is_initialized() and dist.get_world_size() > 1


class SyncedGatedBatchNorm2d(GatedBatchNorm2d):
    """A GatedBatchNorm2d whose training statistics cover the global batch; the gate acts as in its parent."""

    def forward(self, x: Tensor) -> Tensor:
        if not _global_batch(self):
            return super().forward(x)
        self._check_input_dim(x)
        weight, bias = functional.gated_affine(self.weight, self.bias, self.gate())
        return sync_batch_norm(x, self, weight, bias)


#: the synchronised class of each BatchNorm class (same parameters and state-dict keys), and back
SYNCED = {nn.BatchNorm2d: SyncedBatchNorm2d, GatedBatchNorm2d: SyncedGatedBatchNorm2d}
UNSYNCED = {v: k for k, v in SYNCED.items()}


def enable_sync_batchnorm(model: nn.Module) -> int:
    """Synchronise every BatchNorm2d of ``model`` across ranks (in place, by class: :data:`SYNCED`); returns how
    many. :func:`disable_sync_batchnorm` undoes it."""
    n = 0
    for m in model.modules():
        if type(m) in SYNCED:
            m.__class__ = SYNCED[type(m)]
            n += 1
    return n


def disable_sync_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if type(m) in UNSYNCED:
            m.__class__ = UNSYNCED[type(m)]


__all__ = ["DistInfo", "SyncedBatchNorm2d", "SyncedGatedBatchNorm2d", "enable_sync_batchnorm",
           "disable_sync_batchnorm", "setup"]
