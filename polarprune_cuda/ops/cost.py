"""Cost models: the cost of a gate pattern, exactly, in channels, params or MACs.

A :class:`CostModel` gives the cost of a network as a function of its gates:

    cost(p) = const + sum_j linear_j p_j + sum_l coef_l S[a_l] S[b_l]

where ``S[k]`` is the sum of the gates of segment ``k``. The bilinear terms
exist because a convolution's params and MACs scale with both its kept input
channels and its kept output channels. With hard gates ``cost(g)`` is the
exact count of the extracted network; with probabilities it is what
:class:`~polarprune_cuda.PolarizationLoss` drives to its target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class CostModel:
    linear: Tensor      # (n,) float32: cost of each gate on its own
    seg_offsets: Tensor  # (K+1,) int64: segment k holds gates [seg_offsets[k], seg_offsets[k+1]) (empty: no pairs)
    pairs: Tensor       # (L, 2) int64: segment pairs of the bilinear terms
    coef: Tensor        # (L,) float32
    num_segments: int
    const: float        # cost that no gate controls
    total: float        # cost with every gate open

    @classmethod
    def linear_only(cls, weights: Tensor) -> "CostModel":
        """Each gate costs its weight; the total is their sum (reads it once)."""
        w = weights.detach().to(torch.float32)
        empty = torch.zeros(0, dtype=torch.int64, device=w.device)
        return cls(w, empty, empty.view(0, 2), torch.zeros(0, device=w.device), 0, 0.0, float(w.sum()))

    @classmethod
    def channels(cls, n: int, device=None) -> "CostModel":
        """Every gate costs 1 (no device read)."""
        w = torch.ones(n, device=device)
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return cls(w, empty, empty.view(0, 2), torch.zeros(0, device=device), 0, 0.0, float(n))

    @classmethod
    def from_terms(cls, n: int, seg_sizes: list[int], linear: dict[int, float], pairs: dict[tuple[int, int], float],
                   const: float, per_gate: Tensor | None = None) -> "CostModel":
        """Build from per-segment linear costs and (segment, segment) -> coefficient pairs."""
        sizes_t = torch.tensor(seg_sizes, dtype=torch.int64)
        if int(sizes_t.sum()) != n or bool((sizes_t < 1).any()):
            raise ValueError(f"seg_sizes must be positive and add up to n={n}, got {seg_sizes}")
        seg_ids = torch.repeat_interleave(torch.arange(len(seg_sizes)), sizes_t)
        seg_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes_t.cumsum(0)])
        lin = torch.zeros(n, dtype=torch.float64)
        for k, c in linear.items():
            lin[seg_ids == k] += c
        if per_gate is not None:
            lin += per_gate.double()
        keys = sorted(pairs)
        pair_t = torch.tensor(keys, dtype=torch.int64).view(-1, 2)
        coef = torch.tensor([pairs[k] for k in keys], dtype=torch.float64)
        sizes = torch.tensor(seg_sizes, dtype=torch.float64)
        total = const + float(lin.sum()) + float((coef * sizes[pair_t[:, 0]] * sizes[pair_t[:, 1]]).sum()) \
            if len(keys) else const + float(lin.sum())
        if not total > 0:
            raise ValueError("the cost model has a zero total: nothing in the model has that cost")
        return cls(lin.float(), seg_offsets, pair_t, coef.float(), len(seg_sizes), float(const), float(total))

    def to(self, device) -> "CostModel":
        return CostModel(self.linear.to(device), self.seg_offsets.to(device), self.pairs.to(device),
                         self.coef.to(device), self.num_segments, self.const, self.total)

    @property
    def device(self) -> torch.device:
        return self.linear.device

    def cost(self, gates: Tensor) -> Tensor:
        """The cost of a gate pattern (hard 0/1 gates or probabilities), differentiable."""
        g = gates.to(torch.float64)
        value = self.const + (self.linear.double() * g).sum()
        if self.pairs.numel():
            seg_ids = segment_ids(self.seg_offsets, g.numel())
            seg_sum = torch.zeros(self.num_segments, dtype=torch.float64, device=g.device).index_add_(0, seg_ids, g)
            value = value + (self.coef.double() * seg_sum[self.pairs[:, 0]] * seg_sum[self.pairs[:, 1]]).sum()
        return value

    def density(self, gates: Tensor) -> Tensor:
        """cost(gates) / cost(all open)."""
        return self.cost(gates) / self.total

    def op_args(self, device) -> tuple:
        """The cost arguments of ``polarprune::gate_penalty`` on ``device``."""
        cm = self if self.device == torch.device(device) else self.to(device)
        return cm.linear, cm.seg_offsets, cm.pairs, cm.coef, cm.num_segments, cm.const, cm.total


def segment_ids(seg_offsets: Tensor, n: int) -> Tensor:
    """The segment of each of ``n`` gates, from segment offsets (no device read)."""
    return torch.searchsorted(seg_offsets[1:], torch.arange(n, device=seg_offsets.device), right=True)
