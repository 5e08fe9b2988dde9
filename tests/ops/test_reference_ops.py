"""The op layer against independent formulas: opcheck, gradcheck, exact binary gates."""
import pytest
import torch

from polarprune_cuda import ops
from polarprune_cuda.ops import reference
from polarprune_cuda.ops.cost import CostModel
from polarprune_cuda.ops import functional as PF

from helpers import _bilinear_model
from helpers import randn

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------- opcheck
def _opcheck_cases():
    s = randn(37, requires_grad=True)
    s64 = randn(37, dtype=torch.float64, requires_grad=True)
    cost = torch.rand(37) + 0.1
    x = randn(2, 5, 3, 7, requires_grad=True)
    x_cl = randn(3, 5, 4, 4, requires_grad=True, channels_last=True)
    x_bf = randn(2, 5, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    gate5 = (randn(5) > 0).float().requires_grad_()
    w, b = randn(5, requires_grad=True), randn(5, requires_grad=True)
    yield "binary_gate", (s, "identity", 1.0)
    yield "binary_gate", (s64, "sigmoid", 0.7)
    yield "binary_gate", (randn(11, dtype=torch.bfloat16, requires_grad=True), "clipped", 1.0)
    yield "binary_gate_backward", (randn(37), randn(37), "sigmoid", 2.0)
    lin = CostModel.linear_only(cost).op_args("cpu")
    bil = _bilinear_model(37).op_args("cpu")
    yield "gate_penalty", (s, *lin, 1.0, 0.5, 1.0, 0.2, "zhuang", 1.1)
    yield "gate_penalty", (s64, *bil, 0.5, 0.3, 2.0, 0.5, "bimodal", 1.0)
    yield "channel_gate", (x, gate5)
    yield "channel_gate", (x_cl, gate5)
    yield "channel_gate", (x_bf, gate5)
    yield "channel_gate", (randn(4, 5, requires_grad=True), gate5)
    yield "channel_gate_backward", (randn(2, 5, 3, 7), randn(2, 5, 3, 7), (randn(5) > 0).float())
    yield "gated_affine", (w, b, gate5)
    yield "gated_affine_backward", (randn(5), randn(5), randn(5), randn(5), (randn(5) > 0).float())


@pytest.mark.parametrize("name,args", list(_opcheck_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(ops.ALL_OPS[name], args)


def test_every_op_is_in_the_namespace():
    for name in ops.ALL_OPS:
        assert hasattr(torch.ops.polarprune, name), name


# ---------------------------------------------------------------- binary gate
@pytest.mark.parametrize("dtype", FLOATS)
def test_forward_gate_is_exactly_binary(dtype):
    s = torch.cat([randn(301), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 5.0, -5.0])]).to(dtype)
    g = PF.binary_gate(s, "sigmoid", 0.5)
    assert g.dtype == dtype
    assert torch.equal(g, (s > 0).to(dtype))
    assert set(g.unique().tolist()) <= {0.0, 1.0}
    assert g[-6:].tolist() == [0.0, 0.0, 0.0 if dtype == torch.float16 else 1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("ste", ["identity", "clipped", "sigmoid"])
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_straight_through_backward_matches_its_formula(ste, tau):
    s = (randn(257, dtype=torch.float64) * 2).requires_grad_()
    dg = randn(257, dtype=torch.float64)
    PF.binary_gate(s, ste, tau).backward(dg)
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
    s = -torch.rand(16, dtype=torch.float64) - 0.1  # every gate closed
    s.requires_grad_()
    x = randn(3, 16, 5, 5, dtype=torch.float64)
    y = PF.channel_gate(x, PF.binary_gate(s, ste, 1.0))
    assert torch.count_nonzero(y) == 0
    (y * x).sum().backward()
    assert torch.all(s.grad != 0)


# ---------------------------------------------------------------- penalty
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
def test_penalty_value_and_gradient_match_autograd(form, n, rho, kind):
    s = randn(n, dtype=torch.float64) * 2
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
def test_penalty_gradcheck(form):
    s = (randn(23, dtype=torch.float64) * 2).requires_grad_()
    cm = _bilinear_model(23)
    fn = lambda s: ops.gate_penalty(s, cm, 0.8, 0.4, 1.5, 0.6, form, 1.2)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,))


def test_cost_model_of_hard_gates_counts_exactly():
    # Two segments of sizes 2 and 3; cost = 1 + 2*S0 + 5*S0*S1.
    cm = CostModel.from_terms(5, [2, 3], {0: 2.0}, {(0, 1): 5.0}, const=1.0)
    assert cm.total == 1 + 2 * 2 + 5 * 2 * 3
    g = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    assert cm.cost(g).item() == 1 + 2 * 1 + 5 * 1 * 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_penalty_half_inputs_accumulate_in_float32(dtype):
    s = randn(513) * 3
    w = torch.rand(513) + 0.1
    loss32, terms32 = ops.gate_penalty(s, w, 1.0, 0.5, 1.0, 0.2, "bimodal", 1.0)
    loss_h, terms_h = ops.gate_penalty(s.to(dtype), w, 1.0, 0.5, 1.0, 0.2, "bimodal", 1.0)
    assert loss_h.dtype == torch.float32 and terms_h.dtype == torch.float32
    torch.testing.assert_close(loss_h, loss32, atol=2e-2, rtol=2e-2)


def test_penalty_counts_nonfinite_scores():
    s = randn(10)
    s[2], s[7] = float("nan"), float("inf")
    _, terms = ops.gate_penalty(s, torch.ones(10), 1.0, 0.5, 1.0, 0.2, "zhuang", 1.0)
    assert terms[3].item() == 2


# ---------------------------------------------------------------- activation gate and affine
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 1, 1, 1), (3, 3, 7, 7), (2, 67, 5, 3)])
def test_channel_gate_gradcheck(shape, channels_last):
    x = randn(*shape, dtype=torch.float64, requires_grad=True, channels_last=channels_last)
    gate = ((randn(shape[1]) > 0).double() + 0.0).requires_grad_()
    assert torch.autograd.gradcheck(PF.channel_gate, (x, gate))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_gate_matches_formula_and_keeps_layout(dtype, channels_last):
    x = randn(3, 67, 5, 7, dtype=dtype, requires_grad=True, channels_last=channels_last)
    gate = (randn(67) > 0).float().requires_grad_()
    y = PF.channel_gate(x, gate)
    assert torch.equal(y, x.detach() * gate.detach().to(dtype).view(1, -1, 1, 1))
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    dy = randn(*x.shape, dtype=dtype)
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy * gate.detach().to(dtype).view(1, -1, 1, 1))
    dg = (dy.double() * x.detach().double()).sum((0, 2, 3)).float()
    tol = dict(atol=1e-4, rtol=1e-4) if dtype in (torch.float32, torch.float64) else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(gate.grad, dg, **tol)


def test_gated_affine_gradcheck():
    w, b = randn(9, dtype=torch.float64, requires_grad=True), randn(9, dtype=torch.float64, requires_grad=True)
    gate = ((randn(9) > 0).double()).requires_grad_()
    assert torch.autograd.gradcheck(PF.gated_affine, (w, b, gate))


def test_gated_affine_one_output_used():
    w, b = randn(9, requires_grad=True), randn(9, requires_grad=True)
    gate = torch.ones(9, requires_grad=True)
    gw, _ = PF.gated_affine(w, b, gate)
    gw.sum().backward()
    torch.testing.assert_close(gate.grad, w.detach())
    assert b.grad is None or torch.count_nonzero(b.grad) == 0


def test_reference_backward_modes_reject_unknown():
    with pytest.raises(ValueError, match="ste"):
        reference.binary_gate_backward(torch.ones(2), torch.ones(2), "bogus", 1.0)


# ---------------------------------------------------------------- fused bank op
@pytest.mark.parametrize("form", ["zhuang", "bimodal"])
@pytest.mark.parametrize("ste", ["identity", "sigmoid"])
def test_gate_bank_equals_gate_plus_penalty(form, ste):
    cm = _bilinear_model(41)
    s = (randn(41, dtype=torch.float64) * 2).requires_grad_()
    gates, terms = ops.gate_bank(s, ste, 0.8, cm, 0.35, form, 1.1)
    dg = randn(41, dtype=torch.float64)
    ((gates * dg).sum() + 3.0 * terms[1] + 0.25 * terms[2]).backward()
    s2 = s.detach().clone().requires_grad_()
    loss, terms2 = ops.gate_penalty(s2, cm, 0.8, 0.35, 3.0, 0.25, form, 1.1)
    ((PF.binary_gate(s2, ste, 0.8) * dg).sum() + loss).backward()
    assert torch.equal(gates, (s.detach() > 0).double())
    torch.testing.assert_close(terms, terms2)
    torch.testing.assert_close(s.grad, s2.grad)


def test_gate_bank_opcheck():
    cm = _bilinear_model(29)
    s = randn(29, requires_grad=True)
    torch.library.opcheck(ops.ALL_OPS["gate_bank"], (s, "clipped", *cm.op_args("cpu"), 1.0, 0.5, "bimodal", 1.0))
    torch.library.opcheck(ops.ALL_OPS["gate_bank_backward"],
                          (randn(29), randn(4), randn(29), randn(29), randn(29), "sigmoid", 0.5))
