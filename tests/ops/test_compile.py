"""torch.compile(fullgraph=True) of a gated CNN matches eager, forward and backward: on the CPU (the reference), and
with each kernel provider forced (Triton, the CUDA extension; tests/ops/conftest.py)."""
import copy

import pytest
import torch

import polarprune_cuda as pp

from helpers import SmallNet, randn


@pytest.mark.parametrize("bind", [True, False], ids=["bank", "loose"])
def test_compile_fullgraph_matches_eager(bind):
    torch._dynamo.reset()
    torch.manual_seed(7)
    eager = SmallNet()
    if bind:
        pp.bind_gates(eager)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = randn(3, 3, 8, 8, channels_last=True)
    for _ in range(2):  # second step: after the gate scores changed
        y_e, y_c = eager(x), compiled(x)
        torch.testing.assert_close(y_c, y_e, atol=1e-5, rtol=1e-5)
        y_e.square().sum().backward()
        y_c.square().sum().backward()
        for (name, p_e), (_, p_c) in zip(eager.named_parameters(), compiled_model.named_parameters()):
            torch.testing.assert_close(p_c.grad, p_e.grad, atol=1e-5, rtol=1e-4, msg=name)
        for model in (eager, compiled_model):
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.5 * p.grad
                    p.grad = None
    eager.eval()
    compiled_model.eval()
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_with_the_fused_penalty():
    torch._dynamo.reset()
    torch.manual_seed(8)
    eager = SmallNet()
    pp.bind_gates(eager)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    loss_e, loss_c = pp.PolarizationLoss(0.4), pp.PolarizationLoss(0.4)
    loss_e(eager), loss_c(model)   # arm both banks
    x = randn(2, 3, 6, 6)
    total_e = eager(x).square().sum() + loss_e(eager)
    total_c = compiled(x).square().sum() + loss_c(model)
    torch.testing.assert_close(total_c.detach().as_subclass(torch.Tensor),
                               total_e.detach().as_subclass(torch.Tensor), atol=1e-5, rtol=1e-5)
    total_e.backward()
    total_c.backward()
    torch.testing.assert_close(model.polarprune_bank.scores.grad, eager.polarprune_bank.scores.grad,
                               atol=1e-6, rtol=1e-5)


def test_compile_fullgraph_with_the_kernels_forced(kernels):
    torch._dynamo.reset()
    torch.manual_seed(11)
    eager = SmallNet().to(kernels.device)
    pp.bind_gates(eager)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    x = randn(2, 3, 6, 6).to(kernels.device)
    y_e, y_c = eager(x), compiled(x)
    torch.testing.assert_close(y_c, y_e, atol=1e-5, rtol=1e-5)
    (y_e.square().sum() + pp.PolarizationLoss(0.5)(eager)).backward()
    (y_c.square().sum() + pp.PolarizationLoss(0.5)(model)).backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
