"""Helpers shared by the tests (one place): random inputs, a small gated CNN, BatchNorm randomisation,
output comparison, random gate settings, random cost models; for the op tests (tests/ops), the providers and their
checks."""
import math

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


# ------------------------------------------------------------------ the op tests (tests/ops): providers and checks
#: the floating dtypes every op takes
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
#: the implementations of the ops, by the name the op tests give them, and the backend (POLARPRUNE_BACKEND) of each
PROVIDERS = {"reference": "torch", "triton": "triton", "cuda": "cuda"}
NEEDS_GPU = "needs a CUDA GPU"


class Provider:
    """One implementation of every op, called with the signatures of ``ops.reference``: ``provider.channel_gate(x,
    g)``; ``device`` is where its tensors live (``rand`` makes them there)."""

    def __init__(self, name: str, device: str, kernels: dict):
        self.name, self.device, self.kernels = name, torch.device(device), kernels

    def __getattr__(self, op):
        kernels = self.__dict__.get("kernels", {})
        if op not in kernels:
            raise AttributeError(op)
        return kernels[op]

    def __repr__(self):
        return f"Provider({self.name} on {self.device})"

    def rand(self, *shape, dtype=torch.float32, channels_last=False, requires_grad=False):
        """Normal random numbers drawn in float64 on the provider's device, then cast (the same values in every
        dtype up to its rounding)."""
        t = torch.randn(*shape, dtype=torch.float64, device=self.device).to(dtype)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(requires_grad)

    def binary(self, n, dtype=torch.float32, closed=0):
        """A random 0/1 gate of ``n`` channels, channel ``closed`` closed."""
        g = (torch.rand(n, device=self.device) > 0.5).to(dtype)
        g[closed] = 0
        return g


def _reference_provider() -> Provider:
    from polarprune_cuda.ops import common, reference

    return Provider("reference", "cpu", {name: getattr(reference, name) for name in common.OPS})


#: the reference on the CPU, where the op layer runs it without forcing (tests that need no other provider)
REFERENCE = _reference_provider()


def poison_allocator():
    """Fill freed blocks of both pools of PyTorch's CUDA caching allocator with 0xFF bytes (NaN in every float
    dtype): the small pool (blocks of at most 1 MB, which serves most outputs here) and the large pool. An output
    element a kernel leaves unwritten is then NaN, and the comparison fails."""
    held = []
    for nbytes in (512, 4096, 65536, 262144, 1 << 20):            # small pool: many blocks of each size
        held += [torch.full((nbytes,), 255, dtype=torch.uint8, device="cuda") for _ in range(64)]
    for nbytes in (4 << 20, 16 << 20, 64 << 20, 256 << 20):        # large pool
        held += [torch.full((nbytes,), 255, dtype=torch.uint8, device="cuda") for _ in range(2)]
    torch.cuda.synchronize()
    del held


def poison_empty(monkeypatch):
    """Every tensor made by ``torch.empty`` / ``torch.empty_like`` (how the Triton wrappers allocate their outputs)
    starts as NaN (or a huge int), so an element a kernel leaves unwritten fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(math.nan)
        elif t.dtype != torch.bool:
            t.fill_(12345)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def assert_same(a, b, **kw):
    """Equal values (NaN where ``b`` has NaN), within ``kw`` tolerances when given, else exactly."""
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    torch.testing.assert_close(a, b, equal_nan=True, **(kw or dict(rtol=0, atol=0)))


def bits(t):
    """A tensor's bits as integers (to compare two floating results bit for bit, NaN included)."""
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
    return t.detach().contiguous().view(view) if t.is_floating_point() else t


def assert_deterministic(fn, runs=3):
    """``fn()`` (a tensor or a tuple of them) gives bitwise equal outputs in ``runs`` runs."""
    def outputs():
        out = fn()
        return out if isinstance(out, tuple) else (out,)

    first = [bits(o).clone() for o in outputs()]
    for run in range(runs - 1):
        for i, o in enumerate(outputs()):
            assert torch.equal(bits(o), first[i]), f"output {i} differs in run {run + 2}"


VIEWS = ("step2", "sliced", "expanded", "transposed")


def vector_view(p, view: str, n: int, scale: float = 1.0):
    """A strided, sliced, expanded or transposed 1-D view of ``n`` random numbers times ``scale``, on provider
    ``p``'s device: each reads other elements than a linear walk (``expanded``: one element, n times)."""
    if view == "transposed":
        return (p.rand(n, 2) * scale).t()[1]
    base = p.rand(2 * n + 3) * scale
    return {"step2": base[::2][:n], "sliced": base[3:3 + n], "expanded": base[:1].expand(n)}[view]


#: tolerances of a kernel against the reference in the same dtype
KERNEL_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
              torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def gpu_only(test):
    """Marked ``gpu`` (the GPU campaign runs it) and skipped without a CUDA GPU: sizes and checks (past 2^24
    elements and the launch-grid limits, bitwise determinism at sizes that fill a device) that only a GPU runs."""
    import pytest

    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_GPU)(test))


def assert_implements_the_schema(provider_name: str, op: str):
    """Provider ``provider_name``'s implementation of ``op`` takes the registered schema's arguments, by name (and,
    for the CUDA extension's own ``polarprune_C::`` schema, by type, with the same returns and a CUDA kernel
    registered: no GPU needed); a skip says why where it is not here."""
    import inspect

    import pytest

    from polarprune_cuda.ops import common, functional, reference

    schema = common.schema_of(functional.ALL_OPS[op])
    names = [a.name for a in schema.arguments]
    if provider_name == "reference":
        assert list(inspect.signature(getattr(reference, op)).parameters) == names
    elif provider_name == "triton":
        triton_gates = pytest.importorskip("polarprune_cuda.kernels.triton_gates", reason="triton is not installed")
        assert list(inspect.signature(triton_gates.IMPLEMENTATIONS[op]).parameters) == names
    else:
        try:
            import polarprune_cuda._C  # noqa: F401
        except ImportError as exc:
            pytest.skip(f"the CUDA extension is not built here: {exc}")
        cpp = getattr(torch.ops.polarprune_C, op).default._schema
        assert [(a.name, str(a.type)) for a in cpp.arguments] == [(a.name, str(a.type)) for a in schema.arguments]
        assert [str(r.type) for r in cpp.returns] == [str(r.type) for r in schema.returns]
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"polarprune_C::{op}", "CUDA"), op
