"""Each gate op by provider: eager reference, torch.compile, Triton, CUDA extension; forward, backward, full.

Providers are the implementations behind the ``polarprune::*`` ops, called
directly with the reference signatures (no dispatcher in the way). Triton and
the extension are timed on a GPU only (the CPU Triton interpreter is for
testing). Shapes: common.kernel_shapes. Compare within a group.

    .venv/bin/python -m pytest benchmarks/micro/bench_kernels.py -c benchmarks/micro/pytest.ini
"""
import pytest
import torch

import common
import polarprune_cuda as pp

PROVIDERS = common.PROVIDERS
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


def _activation(device, tiny):
    if tiny:
        shape, dtype = (2, 8, 4, 4), torch.float32
    elif device.type == "cuda":
        shape, dtype = (256, 256, 56, 56), torch.bfloat16
    else:
        shape, dtype = (32, 64, 32, 32), torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    gate = (torch.rand(shape[1], generator=g) > 0.5).to(device, dtype)
    return x, torch.randn_like(x), gate


def _calls(op: str, provider: str, device, tiny, bank_case):
    """(forward, backward) callables of ``op`` for ``provider``; a pass that does not exist is None."""
    if op == "channel_gate":
        x, dy, gate = _activation(device, tiny)
        f, b = _impl(provider, "channel_gate", device), _impl(provider, "channel_gate_backward", device)
        return f"{tuple(x.shape)} {str(x.dtype)[6:]} channels_last", (lambda: f(x, gate)), (lambda: b(dy, x, gate))
    if op == "gated_affine":
        c = 8 if tiny else 2048
        w, bias, dw, db = (torch.randn(c, device=device) for _ in range(4))
        gate = (torch.rand(c, device=device) > 0.5).float()
        f, b = _impl(provider, "gated_affine", device), _impl(provider, "gated_affine_backward", device)
        return f"C={c} float32", (lambda: f(w, bias, gate)), (lambda: b(dw, db, w, bias, gate))
    scores, cm = bank_case
    case = f"{scores.numel()} gates, {cm.num_segments} segments, MACs cost"
    args = cm.op_args(device)
    if op == "binary_gate":
        dg = torch.randn_like(scores)
        f, b = _impl(provider, "binary_gate", device), _impl(provider, "binary_gate_backward", device)
        return case, (lambda: f(scores, "identity", 1.0)), (lambda: b(dg, scores, "identity", 1.0))
    if op == "gate_bank":
        f, b = _impl(provider, "gate_bank", device), _impl(provider, "gate_bank_backward", device)
        _, _, gt, gp = f(scores, "identity", *args, 1.0, 0.5, "bimodal", 1.0)
        dg, dterms = torch.randn_like(scores), torch.tensor([0.0, 20.0, 0.1, 0.0], device=device)
        return (case, (lambda: f(scores, "identity", *args, 1.0, 0.5, "bimodal", 1.0)),
                (lambda: b(dg, dterms, scores, gt, gp, "identity", 1.0)))
    if op == "gate_penalty":
        f = _impl(provider, "gate_penalty", device)
        return case, (lambda: f(scores, *args, 1.0, 0.5, 20.0, 0.1, "bimodal", 1.0)), None
    raise ValueError(op)


# gate_penalty computes value and gradient in one call: timed as 'full' only
CASES = [(op, p) for op in ("binary_gate", "gate_bank", "channel_gate", "gated_affine") for p in PASSES] \
    + [("gate_penalty", "full")]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op,pass_", CASES)
def test_kernel(benchmark, op, pass_, provider, device, tiny, rounds, bank_case):
    case, fwd, bwd = _calls(op, provider, device, tiny, bank_case)
    fn = {"forward": fwd, "backward": bwd, "full": (lambda: (fwd(), bwd()) if bwd else fwd())}[pass_]

    calls = 1 if device.type == "cpu" else 20      # on a GPU: 20 back-to-back calls, one synchronisation

    def run():
        for _ in range(calls):
            fn()
        common.sync(device)

    benchmark.group = f"kernel {op} {pass_}: {case}"
    benchmark.extra_info.update(kind="kernel", op=op, pass_=pass_, provider=provider, case=case,
                                calls_per_round=calls)
    benchmark.pedantic(run, rounds=rounds(50), warmup_rounds=3, iterations=1)
