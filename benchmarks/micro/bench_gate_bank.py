"""One gate-bank op call per pass versus one call per layer.

Segment sizes are the BatchNorm widths of a torchvision ResNet-50 (53 layers,
26,560 channels). Compare the groups' medians side by side:

    .venv/bin/python -m pytest benchmarks/micro -c benchmarks/micro/pytest.ini
"""
import pytest
import torch

import polarprune_cuda as pp

from conftest import DEVICE

RESNET50_BN_WIDTHS = [64] + [
    w
    for blocks, width in ((3, 64), (4, 128), (6, 256), (3, 512))
    for b in range(blocks)
    for w in ([width, width, 4 * width] + ([4 * width] if b == 0 else []))
]


def _scores():
    return torch.randn(sum(RESNET50_BN_WIDTHS), device=DEVICE, requires_grad=True)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.benchmark(group="gates forward+backward, ResNet-50 widths")
@pytest.mark.parametrize("how", ["one bank call", "one call per layer"])
def test_gate_bank(benchmark, how):
    scores = _scores()

    def step():
        if how == "one bank call":
            gates = pp.functional.binary_gate(scores).split(RESNET50_BN_WIDTHS)
        else:
            gates = [pp.functional.binary_gate(s) for s in scores.split(RESNET50_BN_WIDTHS)]
        torch.stack([g.sum() for g in gates]).sum().backward()
        _sync()

    benchmark(step)
    assert scores.grad is not None


@pytest.mark.benchmark(group="penalty value+gradient, ResNet-50 widths")
@pytest.mark.parametrize("how", ["fused op", "autograd"])
def test_penalty(benchmark, how):
    scores = _scores()
    cost = torch.rand_like(scores.detach()) + 0.1

    def step():
        if how == "fused op":
            loss, _ = pp.functional.gate_penalty(scores, cost, target_sparsity=0.5)
        else:
            p = torch.sigmoid(scores)
            d = (cost * p).sum() / cost.sum()
            loss = 20.0 * (d - 0.5) ** 2 + 0.1 * (4 * p * (1 - p)).mean()
        loss.backward()
        _sync()

    benchmark(step)
