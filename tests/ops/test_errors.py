"""Bad input raises ValueError or TypeError naming the argument."""
import pytest
import torch

import polarprune_cuda as pp
from polarprune_cuda.ops import functional as PF

from helpers import randn


@pytest.mark.parametrize("call,exc,match", [
    (lambda: PF.binary_gate(torch.arange(4)), TypeError, "scores must be a floating-point"),
    (lambda: PF.binary_gate([0.1, 0.2]), TypeError, "scores must be a torch.Tensor"),
    (lambda: PF.binary_gate(randn(2, 3)), ValueError, "scores must be a 1-D"),
    (lambda: PF.binary_gate(randn(3), ste="straight"), ValueError, "ste must be one of"),
    (lambda: PF.binary_gate(randn(3), tau=0.0), ValueError, "tau must be"),
    (lambda: PF.channel_gate(randn(2, 4, 3, 3), torch.ones(5)), ValueError, "channel-count mismatch.*gate has 5.*x has 4"),
    (lambda: PF.channel_gate(randn(4), torch.ones(4)), ValueError, "x must have shape \\(N, C, ...\\)"),
    (lambda: PF.channel_gate(randn(2, 4, 3, 3), torch.ones(4, 1)), ValueError, "gate must be a 1-D"),
    (lambda: PF.channel_gate(torch.ones(2, 4, dtype=torch.int32), torch.ones(4)), TypeError, "x must be a floating"),
    (lambda: PF.channel_gate(randn(2, 4), torch.ones(4, device="meta")), ValueError, "gate is on meta"),
    (lambda: PF.gated_affine(randn(4), randn(3), torch.ones(4)), ValueError, "channel-count mismatch"),
    (lambda: PF.gated_affine(randn(4), randn(4), torch.ones(4, dtype=torch.long)), TypeError, "gate must be a floating"),
    (lambda: PF.gate_penalty(randn(4), torch.ones(3), target_sparsity=0.5), ValueError, "cost must have the shape"),
    (lambda: PF.gate_penalty(randn(4), torch.ones(4, device="meta"), target_sparsity=0.5), ValueError, "cost is on meta"),
    (lambda: PF.gate_penalty(randn(4), target_sparsity=1.0), ValueError, "target_sparsity must be a number in \\[0, 1\\)"),
    (lambda: PF.gate_penalty(randn(4), target_sparsity=0.5, polarization="l1"), ValueError, "polarization must be one of"),
    (lambda: PF.gate_penalty(randn(4), target_sparsity=0.5, target_weight=-1.0), ValueError, "target_weight"),
    (lambda: pp.PolarizationLoss(target_sparsity=1.0), ValueError, "target_sparsity must be a number in \\[0, 1\\)"),
    (lambda: pp.PolarizationLoss(target_sparsity=-0.1), ValueError, "target_sparsity"),
    (lambda: pp.PolarizationLoss(target_sparsity=float("nan")), ValueError, "target_sparsity"),
    (lambda: pp.PolarizationLoss(0.5, polarization="l2"), ValueError, "polarization must be one of"),
    (lambda: pp.PolarizationLoss(0.5, cost=3), TypeError, "cost must be a str"),
    (lambda: PF.gate_penalty(randn(4), "macs", target_sparsity=0.5), TypeError, "cost_model must be a CostModel"),
    (lambda: pp.PolarizationLoss(0.5, cost=-torch.ones(3)), ValueError, "cost weights must be finite and >= 0"),
    (lambda: pp.PolarizationLoss(0.5, schedule=0.3), TypeError, "schedule must be a callable"),
    (lambda: pp.PolarizationLoss(0.5, cost="macs")(pp.ChannelGate(3)), ValueError, "cost='macs' needs a gate bank"),
    (lambda: pp.PolarizationLoss(0.5, cost=torch.ones(5))(pp.ChannelGate(3)), ValueError, "cost has 5 weights but the model has 3"),
    (lambda: pp.PolarizationLoss(0.5)(torch.nn.Linear(2, 2)), ValueError, "model has no gates"),
    (lambda: pp.PolarizationLoss(0.5)("model"), TypeError, "expected a model with gates"),
    (lambda: pp.ChannelGate(0), ValueError, "num_channels must be a positive int"),
    (lambda: pp.ChannelGate(4, init=torch.ones(3)), ValueError, "init must have shape \\(4,\\)"),
    (lambda: pp.ChannelGate(4, init=torch.ones(4, dtype=torch.long)), TypeError, "init must be a floating"),
    (lambda: pp.ChannelGate(4, ste="hard"), ValueError, "ste must be one of"),
    (lambda: pp.ChannelGate(4)(randn(2, 3, 5, 5)), ValueError, "channel-count mismatch.*gate has 4.*x has 3"),
    (lambda: pp.GatedBatchNorm2d(4, affine=False), ValueError, "affine must be True"),
    (lambda: pp.GatedBatchNorm2d.from_batchnorm(torch.nn.Linear(2, 2)), TypeError, "bn must be an nn.BatchNorm2d"),
    (lambda: pp.gate_stats(pp.ChannelGate(3), margin=0.7), ValueError, "margin"),
])
def test_bad_input_is_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()

