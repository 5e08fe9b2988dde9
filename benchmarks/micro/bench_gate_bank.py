"""The gate bank: one op call per pass versus one call per layer, and the bank of a gated ResNet-50 per direction.

Segment sizes are the BatchNorm widths of a torchvision ResNet-50 (53 layers,
26,560 channels). ``test_bank_direction`` times what a training step runs:
the package's gate-bank op with autograd (gates and the fused MACs penalty in
the forward, the scores' gradient in the backward), per backend, with GPU time
(CUDA events) beside the wall time per call. Compare the groups' medians side
by side:

    .venv/bin/python -m pytest benchmarks/micro -c benchmarks/micro/pytest.ini
"""
import pytest
import torch

import common
import polarprune_cuda as pp
from polarprune_cuda import ops as pops
from polarprune_cuda.ops import backends

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


@pytest.fixture(scope="module")
def resnet50_bank(device, tiny):
    """(scores, bank, cost model, loss) of a gated torchvision ResNet-50 (MACs cost), on ``device``."""
    model = common.build("resnet50")
    size = 32 if tiny else 224
    pp.attach_gates(model, torch.randn(1, 3, size, size))
    loss = pp.PolarizationLoss(0.5, cost="macs")
    bank = pp.find_bank(model).to(device)
    scores = bank.scores.detach().clone()
    scores.add_(torch.randn_like(scores))
    return scores, bank, bank.cost_model("macs"), loss


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_bank_direction(benchmark, backend, direction, resnet50_bank, device, rounds, l2_flush, monkeypatch):
    scores, bank, cm, loss = resnet50_bank
    if backend != "torch":
        b = backends.get_backend(backend)
        if not b.available or device.type != "cuda":
            pytest.skip(f"{backend}: timed on a GPU only" if b.available else f"{backend} unavailable: {b.reason}")
    monkeypatch.setenv(backends.ENV_VAR, backend)
    backends._reset()
    sg = scores.clone().requires_grad_()

    def forward():
        return pops.gate_bank(sg, bank.ste, bank.tau, cm, loss.rho, loss.polarization, loss.t)

    gates, terms = forward()
    dgates = torch.randn_like(gates)
    dterms = torch.tensor([0.0, 1.0, 1.0, 0.0], device=device, dtype=terms.dtype)

    def backward():
        return torch.autograd.grad((gates, terms), sg, (dgates, dterms), retain_graph=True)

    timer = common.RoundTimer(forward if direction == "forward" else backward, 1 if device.type == "cpu" else 20,
                              device)
    warmup = 3
    benchmark.group = f"ResNet-50 gate bank + MACs penalty, {direction}: {sg.numel()} gates, {cm.num_segments} segments"
    benchmark.extra_info.update(kind="bank", backend=backend, direction=direction, gates=sg.numel(),
                                segments=cm.num_segments)
    benchmark.pedantic(timer, setup=l2_flush, rounds=rounds(50), warmup_rounds=warmup, iterations=1)
    benchmark.extra_info.update(timer.info(skip=warmup))
    backends._reset()
