"""gated_affine: a gated BatchNorm affine ``(weight * g, bias * g)`` and its backward (``gated_affine_backward``).

Every provider (tests/ops/conftest.py: the reference, Triton, the CUDA extension) through opcheck, the op layer's
gradients and on views; the reference by gradcheck; the kernels against the reference; on a GPU, sizes past 2^24
and bitwise determinism."""
import pytest
import torch

import polarprune_cuda as pp
from polarprune_cuda import ops
from polarprune_cuda.ops import reference

from helpers import (
    KERNEL_TOL, PROVIDERS, REFERENCE, VIEWS, assert_deterministic, assert_implements_the_schema, gpu_only, tol,
    vector_view
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("name", PROVIDERS)
def test_implements_the_schema(name):
    for op in ("gated_affine", "gated_affine_backward"):
        assert_implements_the_schema(name, op)


OPCHECK = {
    "forward": lambda p: ("gated_affine", (p.rand(5, requires_grad=True), p.rand(5, requires_grad=True),
                                           p.binary(5).requires_grad_())),
    "backward": lambda p: ("gated_affine_backward", (p.rand(5), p.rand(5), p.rand(5), p.rand(5), p.binary(5))),
}


@pytest.mark.parametrize("case", OPCHECK)
def test_opcheck(provider, case):
    name, args = OPCHECK[case](provider)
    torch.library.opcheck(ops.ALL_OPS[name], args)


def test_gradcheck_on_the_reference():
    """float64, where the checked function runs the reference under plain autograd (a kernel's gradients: against
    the reference's backward, below, and through the op in test_one_output_used)."""
    w, b = REFERENCE.rand(9, dtype=torch.float64, requires_grad=True), REFERENCE.rand(9, dtype=torch.float64,
                                                                                      requires_grad=True)
    gate = REFERENCE.binary(9, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(pp.functional.gated_affine, (w, b, gate))


def test_one_output_used(provider):
    """Only the gated weight reaches the loss: the bias's gradient is None or zero, the gate's is the weight."""
    w, b = provider.rand(9, requires_grad=True), provider.rand(9, requires_grad=True)
    gate = torch.ones(9, device=provider.device, requires_grad=True)
    gw, _ = pp.functional.gated_affine(w, b, gate)
    gw.sum().backward()
    torch.testing.assert_close(gate.grad, w.detach())
    assert b.grad is None or torch.count_nonzero(b.grad) == 0


@pytest.mark.parametrize("view", VIEWS)
def test_views(provider, view):
    """Strided, sliced, expanded and transposed weights, biases and gradients read as their contiguous copies."""
    w, b, gw, dg = (vector_view(provider, view, 67) for _ in range(4))
    g = (vector_view(provider, view, 67) > 0).float()
    c = [t.contiguous() for t in (w, b, gw, dg)]
    for a, r in zip(provider.gated_affine(w, b, g), reference.gated_affine(c[0], c[1], g)):
        assert torch.equal(a, r)
    for a, r in zip(provider.gated_affine_backward(gw, dg, w, b, g),
                    reference.gated_affine_backward(c[2], c[3], c[0], c[1], g)):
        torch.testing.assert_close(a, r, **tol(torch.float32, terms=2))


@pytest.mark.parametrize("c", [1, 3, 67, 256, 1500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_the_reference(kernels, c, dtype):
    w, b, g = kernels.rand(c, dtype=dtype), kernels.rand(c, dtype=dtype), (kernels.rand(c) > 0).to(dtype)
    for a, r in zip(kernels.gated_affine(w, b, g), reference.gated_affine(w, b, g)):
        assert torch.equal(a, r)
    gw, gb = kernels.rand(c, dtype=dtype), kernels.rand(c, dtype=dtype)
    for a, r in zip(kernels.gated_affine_backward(gw, gb, w, b, g), reference.gated_affine_backward(gw, gb, w, b, g)):
        torch.testing.assert_close(a, r, **KERNEL_TOL[dtype])


# ---------------------------------------------------------------- on a GPU
@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_gated_affine(kernels, dtype):
    w, b, g = kernels.rand(67, dtype=dtype), kernels.rand(67, dtype=dtype), kernels.binary(67, dtype)
    for a, r in zip(kernels.gated_affine(w, b, g), reference.gated_affine(w, b, g)):
        assert torch.equal(a, r)
    gw, gb = kernels.rand(67, dtype=dtype), kernels.rand(67, dtype=dtype)
    want = reference.gated_affine_backward(gw.double(), gb.double(), w.double(), b.double(), g.double())
    for a, r in zip(kernels.gated_affine_backward(gw, gb, w, b, g), want):
        torch.testing.assert_close(a, r.to(dtype), **tol(dtype, 2))


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_gated_affine_past_2_24_and_grid(kernels, dtype):
    n = (1 << 25) + 3
    w, b, g = kernels.rand(n, dtype=dtype), kernels.rand(n, dtype=dtype), kernels.binary(n, dtype)
    for a, r in zip(kernels.gated_affine(w, b, g), reference.gated_affine(w, b, g)):
        assert torch.equal(a, r)


@gpu_only
def test_gpu_backward_is_deterministic(kernels):
    """Three runs on the same inputs, at a size that fills the device: bitwise equal outputs."""
    n = (1 << 22) + 5
    s, dg = kernels.rand(n) * 2, kernels.rand(n)
    assert_deterministic(lambda: kernels.gated_affine_backward(dg, s, s, dg, dg))
