"""Helpers shared by the tests (one place): random inputs, a small gated CNN, BatchNorm randomisation,
output comparison, random gate settings, random cost models."""
import torch
from torch import nn

import polarprune_cuda as pp
from polarprune_cuda.ops.cost import CostModel


def randn(*shape, dtype=torch.float32, requires_grad=False, channels_last=False):
    t = torch.randn(*shape, dtype=torch.float64).to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


class SmallNet(torch.nn.Module):
    """A small CNN with both gate kinds: conv-GatedBN-relu, conv-ChannelGate-relu, pool, fc."""

    def __init__(self, c1=8, c2=6, classes=4):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, c1, 3, padding=1, bias=False)
        self.bn1 = pp.GatedBatchNorm2d(c1, init=torch.randn(c1))
        self.conv2 = torch.nn.Conv2d(c1, c2, 3, padding=1)
        self.gate2 = pp.ChannelGate(c2, init=torch.randn(c2))
        self.fc = torch.nn.Linear(c2, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.gate2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def block_segments(model):
    bank = model.polarprune_bank
    return {b.name: b.segment for b in bank.surgery.blocks}


def _bilinear_model(n, seed=0):
    """A random cost model with segments, linear terms, pairs (one a self-pair) and a constant."""
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(n - 1, generator=gen)[: min(3, n - 1)].add(1).tolist())
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [n])]
    k = len(sizes)
    linear = {i: float(torch.rand(1, generator=gen)) for i in range(k)}
    pairs = {(i, (i + 1) % k): float(torch.rand(1, generator=gen)) + 0.1 for i in range(k)}
    pairs[(0, 0)] = 0.5
    return CostModel.from_terms(n, sizes, linear, pairs, const=3.0, per_gate=torch.rand(n, generator=gen))


def assert_outputs_match(a, b):
    scale = a.abs().max()
    assert (a - b).abs().max() <= 1e-5 * scale, ((a - b).abs().max() / scale).item()


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics and affine, so closed channels matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=gen))
    return model


def pick_closed(names, seed, frac=0.4):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(names), generator=gen).tolist()
    return {names[i] for i in perm[: max(1, round(frac * len(names)))]}


def set_gates(model, seed, closed_blocks, channel_frac=0.4):
    """Random scores: about ``channel_frac`` of each channel segment closed, the named blocks closed."""
    gen = torch.Generator().manual_seed(seed)
    bank = model.polarprune_bank
    blocks = block_segments(model)
    with torch.no_grad():
        for k, scores in enumerate(bank.scores.split(bank.sizes)):
            values = torch.rand(scores.numel(), generator=gen) + 0.1
            if k in blocks.values():
                name = next(n for n, s in blocks.items() if s == k)
                values *= -1 if name in closed_blocks else 1
            elif scores.numel() > 1:
                perm = torch.randperm(scores.numel(), generator=gen)
                values[perm[: round(channel_frac * scores.numel())]] *= -1
            scores.copy_(values)


def float64_runs(setattr_=setattr):
    """Make the run drivers (train.runs) train in float64: data, weights and gate scores. ``setattr_``:
    monkeypatch.setattr in a test (undone after it), plain setattr in a worker process."""
    import dataclasses

    from polarprune_cuda.train import data as data_mod
    from polarprune_cuda.train import runs

    load, build, attach = data_mod.load_dataset, runs.build, runs.attach_gates   # where runs.py looks them up

    def load64(*args, **kwargs):
        d = load(*args, **kwargs)
        return dataclasses.replace(d, train_x=d.train_x.double(), test_x=d.test_x.double())

    def attach64(model, *args, **kwargs):
        bank = attach(model, *args, **kwargs)
        model.double()
        return bank

    setattr_(data_mod, "load_dataset", load64)
    setattr_(runs, "build", lambda cfg, data, *notes: build(cfg, data, *notes).double())
    setattr_(runs, "attach_gates", attach64)


def without_clock(history) -> dict:
    """A run's history (a dict, or a History) without its wall-clock measurements (loop.CLOCK_FIELDS): what two
    runs of one recipe on one machine and thread count have equal, bit for bit."""
    from dataclasses import asdict, is_dataclass

    from polarprune_cuda.train.loop import CLOCK_FIELDS

    h = asdict(history) if is_dataclass(history) else dict(history)
    return {k: v for k, v in h.items() if k not in CLOCK_FIELDS}


def tol(dtype, terms=1, scale=1.0):
    """assert_close tolerances derived from the dtype: the output's rounding (2 eps of ``dtype``) plus an
    accumulation error of 8 eps of the accumulation type (float32, or float64 for float64) times sqrt(terms)
    for a sum of ``terms`` random-sign products; ``atol`` is that times ``scale``, the result's typical size."""
    eps_out = torch.finfo(dtype).eps
    eps_acc = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    rtol = 2 * eps_out + 8 * eps_acc * max(terms, 1) ** 0.5
    return dict(rtol=rtol, atol=rtol * scale)


def gated_resnet20(seed=0, batch=2):
    """A float64 CIFAR ResNet-20 for 8x8 one-channel images, gated (min_channels=2), its scores random; and
    example inputs of ``batch`` images."""
    from polarprune_cuda.models import build_model

    torch.manual_seed(seed)
    model = build_model("resnet20", 10, 1, False).double()
    x = torch.randn(batch, 1, 8, 8, dtype=torch.float64)
    pp.attach_gates(model, x, min_channels=2)
    with torch.no_grad():
        bank = pp.find_bank(model)
        bank.scores.copy_(torch.randn(bank.scores.shape, dtype=torch.float64))
    return model, x


def one_error_line(err: str) -> str:
    """The refusal is exactly one 'polarprune: error:' line, no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("polarprune: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("polarprune: error: "), err
    return lines[0]
