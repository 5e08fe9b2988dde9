"""Property test: random gate patterns (all-closed groups, single-channel groups, round_to)."""
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import polarprune_cuda as pp


class Tiny(nn.Module):
    """Has a single-channel group, a 3-channel group and a residual pair."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(1)
        self.conv2 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(3)
        self.conv3 = nn.Conv2d(3, 6, 1)
        self.conv4 = nn.Conv2d(6, 6, 3, padding=1, groups=6)   # depthwise, no BN after it
        self.conv5 = nn.Conv2d(3, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        y = self.conv4(torch.relu(self.conv3(x))) + self.conv5(x)
        return self.fc(y.mean((2, 3)))


def _prepare(make, shape):
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    x = torch.randn(*shape)
    pp.attach_gates(model.eval(), x, min_channels=1)
    return model, x


@pytest.fixture(scope="module")
def attached():
    return {"resnet20": _prepare(pp.resnet20, (2, 3, 16, 16)), "tiny": _prepare(Tiny, (2, 3, 8, 8))}


pattern = st.sampled_from(["all_closed", "all_open", "one_open", "random"])


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.large_base_example])
@given(data=st.data(), which=st.sampled_from(["resnet20", "tiny"]),
       min_channels=st.sampled_from([1, 3, 8]), round_to=st.sampled_from([None, 2, 4, 8]))
def test_random_gate_patterns_extract_exactly(attached, data, which, min_channels, round_to):
    model, x = attached[which]
    bank = model.polarprune_bank
    expected_widths = []
    with torch.no_grad():
        for rec, scores in zip(bank.surgery.groups, bank.scores.split(bank.sizes)):
            kind = data.draw(pattern)
            n = scores.numel()
            gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
            values = torch.rand(n, generator=gen) * 3 + 0.1
            signs = {"all_closed": -torch.ones(n), "all_open": torch.ones(n),
                     "one_open": torch.cat([torch.ones(1), -torch.ones(n - 1)])[torch.randperm(n, generator=gen)],
                     "random": torch.randint(0, 2, (n,), generator=gen) * 2.0 - 1}[kind]
            scores.copy_(values * signs)
            kept = int((scores > 0).sum())
            width = max(kept, min(n, min_channels))
            if round_to:
                width = min(n, math.ceil(width / round_to) * round_to)
            expected_widths.append(width)
        gated_out = model(x)
    with warnings.catch_warnings():   # guard warnings are expected for closed groups
        warnings.simplefilter("ignore", UserWarning)
        small = pp.extract(model, x, min_channels=min_channels, round_to=round_to)
    widths = [len(g["kept"]) for g in small.polarprune_spec["groups"]]
    assert widths == expected_widths
    with torch.no_grad():
        out = small.eval()(x)
    assert (out - gated_out).abs().max() <= 1e-5 * gated_out.abs().max() + 1e-7
    assert pp.count(small, x) == pp.predicted_count(model, min_channels=min_channels, round_to=round_to)

