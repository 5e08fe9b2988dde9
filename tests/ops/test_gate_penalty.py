"""gate_penalty: the density-target plus polarization penalty and its gradient, in one pass, over an exact cost model.

Every provider (tests/ops/conftest.py: the reference, Triton, the CUDA extension) through opcheck, with half inputs,
non-finite scores and views; the reference against an independent implementation differentiated by autograd and by
gradcheck; the kernels against the reference; on a GPU, every dtype and bitwise determinism. The cost model's own
count is checked here too (CostModel, ops/cost.py: what the penalty reads)."""
import math

import pytest
import torch

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
    assert_implements_the_schema(name, "gate_penalty")


#: opcheck (schema, fake, autograd registration, AOT dispatch) with each provider forced
OPCHECK = {
    "fp32-bilinear-zhuang": lambda p: (p.rand(37, requires_grad=True), *_bilinear_model(37).op_args(p.device),
                                       1.0, 0.5, 2.0, 0.3, "zhuang", 1.0),
}
#: and on the reference, a linear cost model and float64 (the kernels': against the reference, below)
OPCHECK_REFERENCE = {
    "fp32-linear-zhuang": lambda p: (p.rand(37, requires_grad=True), *CostModel.linear_only(
        torch.rand(37) + 0.1).op_args(p.device), 1.0, 0.5, 1.0, 0.2, "zhuang", 1.1),
    "fp64-bilinear-bimodal": lambda p: (p.rand(37, dtype=torch.float64, requires_grad=True),
                                        *_bilinear_model(37).op_args(p.device), 0.5, 0.3, 2.0, 0.5, "bimodal", 1.0),
}


@pytest.mark.parametrize("case", OPCHECK)
def test_opcheck(provider, case):
    torch.library.opcheck(ops.ALL_OPS["gate_penalty"], OPCHECK[case](provider))


@pytest.mark.parametrize("case", OPCHECK_REFERENCE)
def test_opcheck_on_the_reference(case):
    torch.library.opcheck(ops.ALL_OPS["gate_penalty"], OPCHECK_REFERENCE[case](REFERENCE))


def test_cost_model_of_hard_gates_counts_exactly():
    # Two segments of sizes 2 and 3; cost = 1 + 2*S0 + 5*S0*S1.
    cm = CostModel.from_terms(5, [2, 3], {0: 2.0}, {(0, 1): 5.0}, const=1.0)
    assert cm.total == 1 + 2 * 2 + 5 * 2 * 3
    g = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    assert cm.cost(g).item() == 1 + 2 * 1 + 5 * 1 * 2


# ------------------------- the reference against independent formulas; every provider with half, non-finite, views
def _penalty_by_autograd(s, cost_model, tau, rho, tw, pw, form, t):
    """An independent, straightforward implementation differentiated by autograd."""
    s = s.detach().clone().requires_grad_()
    p = torch.sigmoid(s / tau)
    d = cost_model.density(p)
    if form == "zhuang":
        r = (t * p.abs().sum() - (p - p.mean()).abs().sum()) / p.numel()
    else:
        r = (4 * p * (1 - p)).mean()
    loss = tw * (d - rho) ** 2 + pw * r
    loss.backward()
    return loss.detach(), s.grad, d.detach(), r.detach()


@pytest.mark.parametrize("form", ["zhuang", "bimodal"])
@pytest.mark.parametrize("n", [1, 3, 67, 1000])
@pytest.mark.parametrize("rho", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("kind", ["linear", "bilinear"])
def test_the_reference_matches_autograd(form, n, rho, kind):
    """The specification against an independent implementation differentiated by autograd (float64; the kernels
    are compared with the reference below)."""
    s = REFERENCE.rand(n, dtype=torch.float64) * 2
    if kind == "linear":
        cm = CostModel.linear_only(torch.rand(n, dtype=torch.float64) + 0.05)
    else:
        cm = _bilinear_model(n, seed=n)
    args = (1.3, rho, 2.0, 0.7, form, 1.15)
    loss_ref, grad_ref, d_ref, r_ref = _penalty_by_autograd(s, cm, *args)
    loss, grad, terms = ops.ALL_OPS["gate_penalty"](s, *cm.op_args("cpu"), *args)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(grad, grad_ref)
    torch.testing.assert_close(terms[0], d_ref)
    torch.testing.assert_close(terms[2], r_ref)
    assert terms[3] == 0


@pytest.mark.parametrize("form", ["zhuang", "bimodal"])
def test_gradcheck_on_the_reference(form):
    """A finite difference per score (a kernel's gradient: against the reference's, below, and through the op's
    autograd in test_opcheck)."""
    s = (REFERENCE.rand(23, dtype=torch.float64) * 2).requires_grad_()
    cm = _bilinear_model(23)
    fn = lambda s: ops.gate_penalty(s, cm, 0.8, 0.4, 1.5, 0.6, form, 1.2)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(provider, dtype):
    s = provider.rand(513) * 3
    w = torch.rand(513, device=provider.device) + 0.1
    loss32, terms32 = ops.gate_penalty(s, w, 1.0, 0.5, 1.0, 0.2, "bimodal", 1.0)
    loss_h, terms_h = ops.gate_penalty(s.to(dtype), w, 1.0, 0.5, 1.0, 0.2, "bimodal", 1.0)
    assert loss_h.dtype == torch.float32 and terms_h.dtype == torch.float32
    torch.testing.assert_close(loss_h, loss32, atol=2e-2, rtol=2e-2)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nonfinite_scores_are_counted(provider):
    """NaN, inf and -inf scores are counted in terms[3], through the op layer and by the kernel itself."""
    s = provider.rand(10)
    s[2], s[7] = math.nan, math.inf
    _, terms = ops.gate_penalty(s, torch.ones(10, device=provider.device), 1.0, 0.5, 1.0, 0.2, "zhuang", 1.0)
    assert terms[3].item() == 2
    s = provider.rand(100)
    s[[3, 50]] = torch.tensor([math.nan, -math.inf], device=provider.device)
    _, _, terms = provider.gate_penalty(s, *CostModel.channels(100).op_args(provider.device), 1.0, 0.5, 1.0, 0.1,
                                        "bimodal", 1.0)
    assert terms[3].item() == 2


@pytest.mark.parametrize("view", VIEWS)
def test_views(provider, view):
    """Strided, sliced, expanded (every score equal) and transposed scores read as their contiguous copies."""
    s = vector_view(provider, view, 67, scale=2.0)
    args = _bilinear_model(67, seed=5).op_args(provider.device) + (1.2, 0.45, 3.0, 0.4, "zhuang", 1.1)
    for a, r in zip(provider.gate_penalty(s, *args), reference.gate_penalty(s.contiguous(), *args)):
        torch.testing.assert_close(a, r, rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------- the kernels against the reference
@pytest.mark.parametrize("form", ["zhuang", "bimodal"])
@pytest.mark.parametrize("kind", ["channels", "linear", "bilinear"])
@pytest.mark.parametrize("n", [1, 67, 3001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_match_the_reference(kernels, form, kind, n, dtype):
    s = kernels.rand(n, dtype=dtype) * 2
    cm = {"channels": lambda: CostModel.channels(n), "linear": lambda: CostModel.linear_only(torch.rand(n) + 0.1),
          "bilinear": lambda: _bilinear_model(n, seed=n)}[kind]()
    args = cm.op_args(kernels.device) + (1.2, 0.45, 3.0, 0.4, form, 1.1)
    got, want = kernels.gate_penalty(s, *args), reference.gate_penalty(s, *args)
    for name, a, b in zip(("loss", "grad", "terms"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # float64 is float64 throughout: the float arguments (tau, rho, weights) reach the kernel through memory
        # (kernels/_common.scalar), not as fp32 launch arguments
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
        else:
            torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- on a GPU
@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["zhuang", "bimodal"])
@pytest.mark.parametrize("n", [1, 67, 3001])
@pytest.mark.parametrize("kind", ["channels", "bilinear"])
def test_gpu_penalty(kernels, dtype, form, n, kind):
    s = kernels.rand(n, dtype=dtype) * 2
    cm = (_bilinear_model(n, seed=n) if kind == "bilinear" and n > 1 else CostModel.channels(n)).to("cuda")
    args = cm.op_args("cuda")
    # float64 scores: the whole computation in float64 (costs included); otherwise float32 accumulation
    # (gradients are of size 1/n: atol scaled to them)
    t = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else tol(dtype, n, 1.0 / n)
    got = kernels.gate_penalty(s, *args, 1.1, 0.4, 3.0, 0.5, form, 1.05)
    want = reference.gate_penalty(s, *args, 1.1, 0.4, 3.0, 0.5, form, 1.05)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **t)
    if n > 2:   # strided scores
        v = s[::2]
        cv = CostModel.channels(v.numel()).to("cuda").op_args("cuda")
        for a, b in zip(kernels.gate_penalty(v, *cv, 1.1, 0.4, 3.0, 0.5, form, 1.05),
                        reference.gate_penalty(v, *cv, 1.1, 0.4, 3.0, 0.5, form, 1.05)):
            torch.testing.assert_close(a, b, **t)


@gpu_only
def test_gpu_penalty_is_deterministic(kernels):
    """Three runs on the same inputs, at a size that fills the device: bitwise equal outputs."""
    n = (1 << 22) + 5
    s = kernels.rand(n) * 2
    args = _bilinear_model(n, seed=3).to("cuda").op_args("cuda")
    assert_deterministic(lambda: kernels.gate_penalty(s, *args, 1.0, 0.5, 2.0, 0.3, "bimodal", 0.8))
