"""Training goes on with the extracted network once the gates freeze (green training).

From the freeze on, the hard gates no longer move, so the gated model computes exactly what its extraction
computes: every later step can run on the smaller network. :func:`switch` builds it and carries the training
state over: the weights (extraction copies them), the SGD momentum buffers (gathered with the same element
indices as the weights, :func:`~polarprune_cuda.surgery.extract.index_maps`), the parameter groups with their
learning rates and the schedule's position. The data order and the random generator are untouched (the
extraction runs with the generator's state put back). :func:`write_back` copies the trained weights and
statistics into the gated model at the end, so it computes what the extracted one does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..surgery.extract import extract, index_maps
from ..surgery.inputs import score_ids


@dataclass
class Switched:
    """The extracted network being trained, with its optimizer and schedule, and the index maps that tie
    its tensors to the gated model's."""

    model: nn.Module
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.LambdaLR
    maps: dict[str, Tensor]


class KeptRng:
    """The CPU (and current CUDA) generator state put back on exit: extraction draws nothing from the run's."""

    def __enter__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None
        return self

    def __exit__(self, *exc):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        return False


def extracted(gated: nn.Module, example) -> tuple[nn.Module, dict[str, Tensor]]:
    """The extraction of ``gated`` (checked on ``example``) and its index maps, the generator untouched."""
    with KeptRng():
        small = extract(gated, example)
        maps = index_maps(gated)
    missing = [name for name in maps if name not in dict(gated.state_dict())]
    if missing:
        raise RuntimeError(f"extraction renamed {missing[0]!r}: the training state cannot follow it")
    return small, maps


def _gather(source: Tensor, idx: Tensor) -> Tensor:
    """``source``'s elements at the flat indices ``idx`` (its shape), zero where ``idx`` is -1."""
    flat = source.detach().reshape(-1)
    got = flat[idx.clamp_min(0).reshape(-1).to(flat.device)].view(idx.shape)
    return torch.where(idx.to(got.device) >= 0, got, torch.zeros((), dtype=got.dtype, device=got.device))


def carried_state(state: dict, old: Tensor, new: Tensor, idx: Tensor | None) -> dict:
    """One parameter's optimizer state (``old``'s) for ``new``, the parameter it became: state tensors of
    ``old``'s shape (momentum, ``exp_avg``, ``exp_avg_sq``, ...) gathered by the index map ``idx`` (None: the
    parameter kept its shape) into ``new``'s layout; other tensors (step counts) copied; None entries dropped.
    The one carry of every change of network: the switch, a shrink, :class:`~polarprune_cuda.OnePass`."""
    out = {}
    for key, value in state.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape == old.shape:
            src = _gather(value, idx) if idx is not None else value.detach()
            out[key] = torch.empty_like(new.detach(), dtype=value.dtype).copy_(src)   # the parameter's layout
        elif isinstance(value, Tensor):
            out[key] = value.detach().clone()
        elif value is not None:
            out[key] = value
    return out


def carry_optimizer(gated: nn.Module, opt: torch.optim.SGD, sched: torch.optim.lr_scheduler.LambdaLR,
                    small: nn.Module, maps: dict[str, Tensor]) -> tuple[torch.optim.SGD,
                                                                       torch.optim.lr_scheduler.LambdaLR]:
    """SGD for ``small`` with ``opt``'s groups (the first holds the weights; the second the gate scores where
    ``small`` still has a bank, else it stays, empty, so the schedule keeps its lambdas), momentum buffers
    carried by :func:`carried_state` (tensors ``maps`` does not name, the gate scores, whole), and ``sched``'s
    position."""
    scores = score_ids(small)
    groups = []
    for i, group in enumerate(opt.param_groups):
        hyper = {k: v for k, v in group.items() if k != "params"}
        params = [p for p in small.parameters() if p.requires_grad and (id(p) in scores) == (i == 1)]
        groups.append({"params": params, **hyper})
    new = torch.optim.SGD(groups)
    named = dict(gated.named_parameters())
    for name, p in small.named_parameters():
        old = named.get(name)
        state = carried_state(opt.state[old], old, p, maps.get(name)) \
            if p.requires_grad and old is not None and old in opt.state else None
        if state:
            new.state[p] = state
    new_sched = torch.optim.lr_scheduler.LambdaLR(new, sched.lr_lambdas)
    new_sched.load_state_dict(sched.state_dict())
    for g_new, g_old in zip(new.param_groups, opt.param_groups):
        g_new["lr"] = g_old["lr"]
        if "initial_lr" in g_old:
            g_new["initial_lr"] = g_old["initial_lr"]
    return new, new_sched


def switch(gated: nn.Module, opt: torch.optim.SGD, sched: torch.optim.lr_scheduler.LambdaLR, example, *,
           channels_last: bool = False) -> Switched:
    """The extracted network of ``gated`` (gates frozen) with ``opt``'s state and ``sched``'s position on it."""
    small, maps = extracted(gated, example)
    small.train(gated.training)
    if channels_last:
        small.to(memory_format=torch.channels_last)
    new_opt, new_sched = carry_optimizer(gated, opt, sched, small, maps)
    return Switched(small, new_opt, new_sched, maps)


def compose(first: dict[str, Tensor] | None, then: dict[str, Tensor]) -> dict[str, Tensor]:
    """Index maps of two changes in a row (``first`` from A to B, ``then`` from B to C): from A to C."""
    if first is None:
        return dict(then)
    out = {}
    for name, idx in then.items():
        if name not in first:
            out[name] = idx
            continue
        prev = first[name].reshape(-1)
        got = prev[idx.clamp_min(0).reshape(-1)].view(idx.shape)
        out[name] = torch.where(idx >= 0, got, torch.full_like(got, -1))
    return out


@torch.no_grad()
def write_back(small: nn.Module, gated: nn.Module, maps: dict[str, Tensor]) -> None:
    """Copy ``small``'s parameters and buffers into the elements of ``gated`` they came from (integer buffers,
    such as BatchNorm's batch count, whole). The gated model then computes what ``small`` does; the closed
    channels keep their values, which the closed gates multiply by zero."""
    target = gated.state_dict(keep_vars=True)
    for name, t in small.state_dict(keep_vars=True).items():
        dst = target[name]
        if name not in maps and dst.shape != t.shape:
            raise RuntimeError(f"write_back: {name!r} changed shape and has no index map")
        if name in maps:
            idx = maps[name].reshape(-1).to(dst.device)
            keep = idx >= 0
            flat = dst.detach().reshape(-1).clone()
            flat[idx[keep]] = t.detach().reshape(-1)[keep].to(flat.dtype)
            dst.detach().copy_(flat.view(dst.shape))
        else:
            dst.detach().copy_(t.detach())
