"""binary_gate: hard gates ``g = 1[s > 0]`` and the straight-through backward (``binary_gate_backward``).

Every provider (tests/ops/conftest.py: the reference, Triton, the CUDA extension) through opcheck, against the
formulas (exactly binary, the straight-through gradient), on views; the kernels also against the reference (float64
tau included); on a GPU, sizes past 2^24 and bitwise determinism."""
import pytest
import torch

import polarprune_cuda as pp
from polarprune_cuda import ops
from polarprune_cuda.ops import reference

from helpers import (
    FLOATS, KERNEL_TOL, PROVIDERS, REFERENCE, VIEWS, assert_deterministic, assert_implements_the_schema, assert_same,
    gpu_only, tol, vector_view
)

STES = ("identity", "clipped", "sigmoid")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("name", PROVIDERS)
def test_implements_the_schema(name):
    for op in ("binary_gate", "binary_gate_backward"):
        assert_implements_the_schema(name, op)


#: opcheck (schema, fake, autograd registration, AOT dispatch) with each provider forced
OPCHECK = {
    "fp32-sigmoid": lambda p: ("binary_gate", (p.rand(37, requires_grad=True), "sigmoid", 0.8)),
    "backward-clipped": lambda p: ("binary_gate_backward", (p.rand(37), p.rand(37), "clipped", 1.0)),
}
#: and on the reference, the registration in every dtype and STE (the kernels' dtypes: against the reference, below)
OPCHECK_REFERENCE = {
    "fp32-identity": lambda p: ("binary_gate", (p.rand(37, requires_grad=True), "identity", 1.0)),
    "fp64-sigmoid": lambda p: ("binary_gate", (p.rand(37, dtype=torch.float64, requires_grad=True), "sigmoid", 0.7)),
    "bf16-clipped": lambda p: ("binary_gate", (p.rand(11, dtype=torch.bfloat16, requires_grad=True), "clipped", 1.0)),
    "backward-sigmoid": lambda p: ("binary_gate_backward", (p.rand(37), p.rand(37), "sigmoid", 2.0)),
}


@pytest.mark.parametrize("case", OPCHECK)
def test_opcheck(provider, case):
    name, args = OPCHECK[case](provider)
    torch.library.opcheck(ops.ALL_OPS[name], args)


@pytest.mark.parametrize("case", OPCHECK_REFERENCE)
def test_opcheck_on_the_reference(case):
    name, args = OPCHECK_REFERENCE[case](REFERENCE)
    torch.library.opcheck(ops.ALL_OPS[name], args)


# ---------------------------------------------------------------- forward: exactly binary
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 3, 67, 1000, 5003])
def test_forward_is_exactly_binary(provider, n, dtype):
    edges = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 5.0, -5.0], dtype=torch.float64, device=provider.device)
    s = torch.cat([provider.rand(n, dtype=torch.float64), edges]).to(dtype)
    s[0] = 0.0
    g = pp.functional.binary_gate(s, "sigmoid", 0.5)     # through the op layer, on the provider's kernel
    assert g.dtype == dtype
    assert torch.equal(g, (s > 0).to(dtype))
    assert set(g.unique().tolist()) <= {0.0, 1.0}
    assert g[-6:].tolist() == [0.0, 0.0, 0.0 if dtype == torch.float16 else 1.0, 0.0, 1.0, 0.0]


# ---------------------------------------------------------------- backward: straight through
@pytest.mark.parametrize("ste", STES)
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_backward_matches_the_straight_through_formula(provider, ste, tau):
    s = (provider.rand(257, dtype=torch.float64) * 2).requires_grad_()
    dg = provider.rand(257, dtype=torch.float64)
    pp.functional.binary_gate(s, ste, tau).backward(dg)
    if ste == "identity":
        expected = dg
    elif ste == "clipped":
        expected = dg * (s.detach().abs() <= 1)
    else:
        s2 = s.detach().clone().requires_grad_()
        torch.sigmoid(s2 / tau).backward(dg)
        expected = s2.grad
    torch.testing.assert_close(s.grad, expected)


@pytest.mark.parametrize("ste", ["identity", "sigmoid"])
def test_closed_gates_receive_gradient(ste):
    """Through channel_gate on the reference (each provider's straight-through backward: above)."""
    s = -REFERENCE.rand(16, dtype=torch.float64).abs() - 0.1   # every gate closed
    s.requires_grad_()
    x = REFERENCE.rand(3, 16, 5, 5, dtype=torch.float64)
    y = pp.functional.channel_gate(x, pp.functional.binary_gate(s, ste, 1.0))
    assert torch.count_nonzero(y) == 0
    (y * x).sum().backward()
    assert torch.all(s.grad != 0)


def test_an_unknown_ste_is_refused(provider):
    ones = torch.ones(2, device=provider.device)
    with pytest.raises(RuntimeError if provider.name == "cuda" else ValueError, match="ste must be one of"):
        provider.binary_gate_backward(ones, ones, "bogus", 1.0)


@pytest.mark.parametrize("view", VIEWS)
def test_views(provider, view):
    """Strided, sliced, expanded and transposed scores and gradients read as their contiguous copies."""
    s, dg = vector_view(provider, view, 67, scale=2.0), vector_view(provider, view, 67)
    for ste in ("clipped", "sigmoid"):
        assert_same(provider.binary_gate(s, ste, 0.7), reference.binary_gate(s.contiguous(), ste, 0.7))
        torch.testing.assert_close(provider.binary_gate_backward(dg, s, ste, 0.7),
                                   reference.binary_gate_backward(dg.contiguous(), s.contiguous(), ste, 0.7),
                                   **tol(torch.float32))


# ---------------------------------------------------------------- the kernels against the reference
@pytest.mark.parametrize("ste", STES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_kernel_matches_the_reference(kernels, ste, dtype):
    s, dg = kernels.rand(1031, dtype=dtype) * 2, kernels.rand(1031, dtype=dtype)
    torch.testing.assert_close(kernels.binary_gate_backward(dg, s, ste, 0.6),
                               reference.binary_gate_backward(dg, s, ste, 0.6), **KERNEL_TOL[dtype])


@pytest.mark.parametrize("ste", STES)
def test_float64_tau_reaches_the_kernel_as_float64(kernels, ste):
    """tau of a float64 launch travels through memory (kernels/_common.scalar), not as an fp32 launch argument."""
    s, dg = kernels.rand(300, dtype=torch.float64) * 2, kernels.rand(300, dtype=torch.float64)
    tau = 0.1 + 1e-9  # not representable in fp32
    torch.testing.assert_close(kernels.binary_gate_backward(dg, s, ste, tau),
                               reference.binary_gate_backward(dg, s, ste, tau), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- on a GPU
@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ste", STES)
def test_gpu_gate_kernels(kernels, dtype, ste):
    s, dg = kernels.rand(5003, dtype=dtype) * 2, kernels.rand(5003, dtype=dtype)
    s[:3] = torch.tensor([1e-300 if dtype == torch.float64 else 1e-30, -0.0, 0.0])   # tiny positive: open
    assert torch.equal(kernels.binary_gate(s, ste, 0.7), reference.binary_gate(s, ste, 0.7))
    want = reference.binary_gate_backward(dg.double(), s.double(), ste, 0.7).to(dtype)
    torch.testing.assert_close(kernels.binary_gate_backward(dg, s, ste, 0.7), want, **tol(dtype))
    strided = s[::2]   # a strided view is read element by element, not linearly
    assert torch.equal(kernels.binary_gate(strided, ste, 0.7), reference.binary_gate(strided, ste, 0.7))


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_binary_gate_past_2_24_and_grid(kernels, dtype):
    s = kernels.rand((1 << 25) + 3, dtype=dtype)
    assert torch.equal(kernels.binary_gate(s, "identity", 1.0), reference.binary_gate(s, "identity", 1.0))


@gpu_only
def test_gpu_backward_is_deterministic(kernels):
    """Three runs on the same inputs, at a size that fills the device: bitwise equal outputs."""
    n = (1 << 22) + 5
    s, dg = kernels.rand(n) * 2, kernels.rand(n)
    assert_deterministic(lambda: kernels.binary_gate_backward(dg, s, "sigmoid", 0.7))
