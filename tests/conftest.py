import os

import torch

# Triton kernels run on CPU tensors through Triton's interpreter; it must be on
# before polarprune_cuda.kernels is imported. On a CUDA machine they run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import polarprune_cuda as pp  # noqa: E402
from polarprune_cuda.ops import backends  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_clean_backend(monkeypatch):
    """Fresh seed per test; no backend forced unless a test says so."""
    torch.manual_seed(1234)
    if "POLARPRUNE_BACKEND" in os.environ:
        monkeypatch.delenv("POLARPRUNE_BACKEND")
    backends._reset()
    yield
    backends._reset()


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
