"""Each gate op by provider: eager reference, torch.compile, Triton, CUDA extension; forward, backward, full;
beside them a device copy of the bytes the op must move at least (the bandwidth ceiling).

Providers are the implementations behind the ``polarprune::*`` ops, called
directly with the reference signatures (no dispatcher in the way). Triton and
the extension are timed on a GPU only (the CPU Triton interpreter is for
testing). Compare within a group. Every result carries ``floor_bytes`` (each
input read once, each output written once) and, on a GPU, ``gpu_us`` (CUDA
events) beside ``wall_us`` per call: a round is 20 back-to-back calls after
an untimed, read-only L2 flush (common.L2Flush).

    .venv/bin/python -m pytest benchmarks/micro/bench_kernels.py -c benchmarks/micro/pytest.ini
"""
import math

import pytest
import torch

import common
import polarprune_cuda as pp

PROVIDERS = common.PROVIDERS + ("copy",)
PASSES = ("forward", "backward", "full")


def _impl(provider: str, op: str, device):
    fn, why = common.provider_op(provider, op, device)
    if fn is None:
        pytest.skip(why)
    return fn


@pytest.fixture(scope="module")
def bank_case(device, tiny):
    model = common.build("resnet56" if tiny else "resnet50")
    size = 32 if tiny else 224
    pp.attach_gates(model, torch.randn(1, 3, size, size))
    bank = model.polarprune_bank
    scores = bank.scores.detach().clone().to(device)
    scores.add_(torch.randn_like(scores))
    cm = bank.cost_model("macs").to(device)
    return scores, cm


def _activation_spec(device, tiny) -> tuple[tuple, torch.dtype]:
    """(shape, dtype) of the channel_gate activation (channels_last)."""
    if tiny:
        return (2, 8, 4, 4), torch.float32
    if device.type == "cuda":
        return (256, 256, 56, 56), torch.bfloat16
    return (32, 64, 32, 32), torch.float32


def _activation(device, tiny):
    shape, dtype = _activation_spec(device, tiny)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    gate = (torch.rand(shape[1], generator=g) > 0.5).to(device, dtype)
    return x, torch.randn_like(x), gate


def _affine_channels(tiny) -> int:
    return 8 if tiny else 2048


def _floors(per_fwd: int, per_bwd: int | None) -> dict:
    return {"forward": per_fwd, "backward": per_bwd, "full": per_fwd + (per_bwd or 0)}


def _case(op: str, device, tiny, bank_case) -> tuple[str, dict]:
    """(the case's label, floor bytes per pass) of ``op``, without making its inputs. The floor counts each input
    read once and each output written once."""
    if op == "channel_gate":
        shape, dtype = _activation_spec(device, tiny)
        nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        label = f"{shape} {str(dtype)[6:]} channels_last"
        return label, _floors(2 * nbytes, 3 * nbytes)     # read x, write y | read dy and x, write dx
    if op == "gated_affine":
        c = _affine_channels(tiny)
        return f"C={c} float32", _floors(5 * 4 * c, 8 * 4 * c)   # w, b, g -> w', b' | gw, gb, w, b, g -> dw, db, dg
    scores, cm = bank_case
    n = scores.numel()
    label = f"{n} gates, {cm.num_segments} segments, MACs cost"
    if op == "binary_gate":
        return label, _floors(2 * 4 * n, 3 * 4 * n)       # s -> g | dg, s -> ds
    if op == "gate_bank":
        return label, _floors(5 * 4 * n, 5 * 4 * n)       # s, cost -> g, dT, dP | dg, s, dT, dP -> ds
    if op == "gate_penalty":
        return label, {"full": 3 * 4 * n}                 # s, cost -> grad
    raise ValueError(op)


def _calls(op: str, provider: str, device, tiny, bank_case):
    """(forward, backward) callables of ``op`` for ``provider``; a pass that does not exist is None."""
    if op == "channel_gate":
        x, dy, gate = _activation(device, tiny)
        f, b = _impl(provider, "channel_gate", device), _impl(provider, "channel_gate_backward", device)
        return (lambda: f(x, gate)), (lambda: b(dy, x, gate))
    if op == "gated_affine":
        c = _affine_channels(tiny)
        w, bias, dw, db = (torch.randn(c, device=device) for _ in range(4))
        gate = (torch.rand(c, device=device) > 0.5).float()
        f, b = _impl(provider, "gated_affine", device), _impl(provider, "gated_affine_backward", device)
        return (lambda: f(w, bias, gate)), (lambda: b(dw, db, w, bias, gate))
    scores, cm = bank_case
    args = cm.op_args(device)
    if op == "binary_gate":
        dg = torch.randn_like(scores)
        f, b = _impl(provider, "binary_gate", device), _impl(provider, "binary_gate_backward", device)
        return (lambda: f(scores, "identity", 1.0)), (lambda: b(dg, scores, "identity", 1.0))
    if op == "gate_bank":
        f, b = _impl(provider, "gate_bank", device), _impl(provider, "gate_bank_backward", device)
        _, _, gt, gp = f(scores, "identity", *args, 1.0, 0.5, "bimodal", 1.0)
        dg, dterms = torch.randn_like(scores), torch.tensor([0.0, 20.0, 0.1, 0.0], device=device)
        return ((lambda: f(scores, "identity", *args, 1.0, 0.5, "bimodal", 1.0)),
                (lambda: b(dg, dterms, scores, gt, gp, "identity", 1.0)))
    if op == "gate_penalty":
        f = _impl(provider, "gate_penalty", device)
        return (lambda: f(scores, *args, 1.0, 0.5, 20.0, 0.1, "bimodal", 1.0)), None
    raise ValueError(op)


# gate_penalty computes value and gradient in one call: timed as 'full' only
CASES = [(op, p) for op in ("binary_gate", "gate_bank", "channel_gate", "gated_affine") for p in PASSES] \
    + [("gate_penalty", "full")]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op,pass_", CASES)
def test_kernel(benchmark, op, pass_, provider, device, tiny, rounds, bank_case, l2_flush):
    case, floors = _case(op, device, tiny, bank_case)
    floor = floors.get(pass_)
    if provider == "copy":
        if floor is None:
            pytest.skip(f"{op} has no {pass_} pass")
        src = torch.randint(0, 255, (floor // 2,), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731   (reads and writes floor // 2 bytes: floor bytes moved)
    else:
        fwd, bwd = _calls(op, provider, device, tiny, bank_case)
        fn = {"forward": fwd, "backward": bwd, "full": (lambda: (fwd(), bwd()) if bwd else fwd())}[pass_]
    timer = common.RoundTimer(fn, 1 if device.type == "cpu" else 20, device)
    warmup = 3
    benchmark.group = f"kernel {op} {pass_}: {case}"
    benchmark.extra_info.update(kind="kernel", op=op, pass_=pass_, provider=provider, case=case,
                                floor_bytes=floor)
    benchmark.pedantic(timer, setup=l2_flush, rounds=rounds(50), warmup_rounds=warmup,
                       iterations=1)
    benchmark.extra_info.update(timer.info(skip=warmup))
