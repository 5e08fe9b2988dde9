"""gate_bank: every hard gate and both penalty terms of a gate bank in one pass, and its backward
(``gate_bank_backward``).

Every provider (tests/ops/conftest.py: the reference, Triton, the CUDA extension) through opcheck and on views; the
reference against the composition it fuses (binary_gate plus gate_penalty); the kernels against the reference,
float64 arguments included; on a GPU, every dtype and bitwise determinism."""
import pytest
import torch

import polarprune_cuda as pp
from polarprune_cuda import ops
from polarprune_cuda.ops import reference
from polarprune_cuda.ops.cost import CostModel

from helpers import (
    PROVIDERS, REFERENCE, VIEWS, assert_deterministic, assert_implements_the_schema, _bilinear_model, gpu_only, tol,
    vector_view
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("name", PROVIDERS)
def test_implements_the_schema(name):
    for op in ("gate_bank", "gate_bank_backward"):
        assert_implements_the_schema(name, op)


#: opcheck (schema, fake, autograd registration, AOT dispatch) with each provider forced
OPCHECK = {
    "identity": lambda p: ("gate_bank", (p.rand(37, requires_grad=True), "identity", *_bilinear_model(37).op_args(
        p.device), 1.0, 0.5, "bimodal", 1.0)),
}
#: and on the reference, another STE and the backward op on its own
OPCHECK_REFERENCE = {
    "clipped": lambda p: ("gate_bank", (p.rand(29, requires_grad=True), "clipped", *_bilinear_model(29).op_args(
        p.device), 1.0, 0.5, "bimodal", 1.0)),
    "backward": lambda p: ("gate_bank_backward", (p.rand(29), p.rand(4), p.rand(29), p.rand(29), p.rand(29),
                                                  "sigmoid", 0.5)),
}


@pytest.mark.parametrize("case", OPCHECK)
def test_opcheck(provider, case):
    name, args = OPCHECK[case](provider)
    torch.library.opcheck(ops.ALL_OPS[name], args)


@pytest.mark.parametrize("case", OPCHECK_REFERENCE)
def test_opcheck_on_the_reference(case):
    name, args = OPCHECK_REFERENCE[case](REFERENCE)
    torch.library.opcheck(ops.ALL_OPS[name], args)


@pytest.mark.parametrize("form", ["zhuang", "bimodal"])
@pytest.mark.parametrize("ste", ["identity", "sigmoid"])
def test_equals_binary_gate_plus_penalty(form, ste):
    """The fused op's gates, terms and gradients are those of binary_gate and gate_penalty called apart, on the
    reference (the kernels: against the reference, below)."""
    cm = _bilinear_model(41)
    s = (REFERENCE.rand(41, dtype=torch.float64) * 2).requires_grad_()
    gates, terms = ops.gate_bank(s, ste, 0.8, cm, 0.35, form, 1.1)
    dg = REFERENCE.rand(41, dtype=torch.float64)
    ((gates * dg).sum() + 3.0 * terms[1] + 0.25 * terms[2]).backward()
    s2 = s.detach().clone().requires_grad_()
    loss, terms2 = ops.gate_penalty(s2, cm, 0.8, 0.35, 3.0, 0.25, form, 1.1)
    ((pp.functional.binary_gate(s2, ste, 0.8) * dg).sum() + loss).backward()
    assert torch.equal(gates, (s.detach() > 0).double())
    torch.testing.assert_close(terms, terms2)
    torch.testing.assert_close(s.grad, s2.grad)


@pytest.mark.parametrize("view", VIEWS)
def test_views(provider, view):
    """Strided, sliced, expanded (every score equal) and transposed scores and gradients read as their contiguous
    copies."""
    s, dg, w, gw = (vector_view(provider, view, 67, scale) for scale in (2.0, 1.0, 1.0, 1.0))
    cm = _bilinear_model(67, seed=5)
    args = (s, "sigmoid", *cm.op_args(provider.device), 0.9, 0.45, "bimodal", 1.05)
    got, want = provider.gate_bank(*args), reference.gate_bank(s.contiguous(), *args[1:])
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=2e-5, atol=1e-6)
    dterms = provider.rand(8)[::2]
    torch.testing.assert_close(provider.gate_bank_backward(dg, dterms, s, gw, w, "sigmoid", 0.9),
                               reference.gate_bank_backward(dg.contiguous(), dterms.contiguous(), s.contiguous(),
                                                            gw.contiguous(), w.contiguous(), "sigmoid", 0.9),
                               **tol(torch.float32, terms=3))


# ---------------------------------------------------------------- the kernels against the reference
@pytest.mark.parametrize("form", ["zhuang", "bimodal"])
@pytest.mark.parametrize("ste", ["identity", "clipped", "sigmoid"])
@pytest.mark.parametrize("n", [1, 67, 3001])
def test_kernels_match_the_reference(kernels, form, ste, n):
    s = kernels.rand(n) * 2
    cm = _bilinear_model(n, seed=n) if n > 1 else CostModel.channels(1)
    args = (s, ste, *cm.op_args(kernels.device), 0.9, 0.45, form, 1.05)
    got, want = kernels.gate_bank(*args), reference.gate_bank(*args)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    dg, dterms = kernels.rand(n), kernels.rand(4)
    torch.testing.assert_close(kernels.gate_bank_backward(dg, dterms, s, got[2], got[3], ste, 0.9),
                               reference.gate_bank_backward(dg, dterms, s, want[2], want[3], ste, 0.9),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ste", ["identity", "clipped", "sigmoid"])
def test_float64_arguments_reach_the_kernels_as_float64(kernels, ste):
    """tau and rho of a float64 launch travel through memory (kernels/_common.scalar): forward and backward agree
    with the reference to 1e-10 and 1e-12."""
    s, dg = kernels.rand(300, dtype=torch.float64) * 2, kernels.rand(300, dtype=torch.float64)
    tau = 0.1 + 1e-9  # not representable in fp32
    cm = _bilinear_model(300, seed=3)
    args = (s, ste, *cm.op_args(kernels.device), tau, 0.45 + 1e-9, "zhuang", 1.05)
    got, want = kernels.gate_bank(*args), reference.gate_bank(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    dterms = kernels.rand(4, dtype=torch.float64)
    torch.testing.assert_close(kernels.gate_bank_backward(dg, dterms, s, got[2], got[3], ste, tau),
                               reference.gate_bank_backward(dg, dterms, s, want[2], want[3], ste, tau),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- on a GPU
@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["zhuang", "bimodal"])
@pytest.mark.parametrize("n", [1, 67, 3001])
@pytest.mark.parametrize("kind", ["channels", "bilinear"])
def test_gpu_bank(kernels, dtype, form, n, kind):
    s = kernels.rand(n, dtype=dtype) * 2
    cm = (_bilinear_model(n, seed=n) if kind == "bilinear" and n > 1 else CostModel.channels(n)).to("cuda")
    args = cm.op_args("cuda")
    # float64 scores: the whole computation in float64 (costs included); otherwise float32 accumulation
    # (gradients are of size 1/n: atol scaled to them)
    t = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else tol(dtype, n, 1.0 / n)
    got = kernels.gate_bank(s, "sigmoid", *args, 1.1, 0.4, form, 1.05)
    want = reference.gate_bank(s, "sigmoid", *args, 1.1, 0.4, form, 1.05)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, **t)
    dg, dt = kernels.rand(n, dtype=dtype), kernels.rand(4, dtype=got[1].dtype)
    torch.testing.assert_close(kernels.gate_bank_backward(dg, dt, s, got[2], got[3], "clipped", 1.1),
                               reference.gate_bank_backward(dg, dt, s, want[2], want[3], "clipped", 1.1), **t)


@gpu_only
@pytest.mark.parametrize("op", ["gate_bank", "gate_bank_backward"])
def test_gpu_bank_is_deterministic(kernels, op):
    """Three runs on the same inputs, at a size that fills the device: bitwise equal outputs."""
    n = (1 << 22) + 5
    s, dg = kernels.rand(n) * 2, kernels.rand(n)
    if op == "gate_bank":
        args = _bilinear_model(n, seed=3).to("cuda").op_args("cuda")
        assert_deterministic(lambda: kernels.gate_bank(s, "sigmoid", *args, 1.0, 0.5, "zhuang", 0.8))
    else:
        dterms = kernels.rand(4)
        assert_deterministic(lambda: kernels.gate_bank_backward(dg, dterms, s, dg, s, "sigmoid", 1.0))
