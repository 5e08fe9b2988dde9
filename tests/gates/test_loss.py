"""PolarizationLoss: toy optimisation reaches the target, NaN reporting, schedules, gate_stats."""
import pytest
import torch

import polarprune_cuda as pp

from helpers import SmallNet, randn


def optimise_scores(target_sparsity, n=1000, steps=800, seed=0, cost=None, **loss_kwargs):
    """Scores alone, from random init, SGD with momentum (lr scaled by n: the penalty is a mean)."""
    gen = torch.Generator().manual_seed(seed)
    gate = pp.ChannelGate(n, init=torch.randn(n, generator=gen))
    loss_fn = pp.PolarizationLoss(target_sparsity, cost="channels" if cost is None else cost, **loss_kwargs)
    opt = torch.optim.SGD(gate.parameters(), lr=1.0 * n, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(gate).backward()
        opt.step()
    return gate, pp.gate_stats(gate, cost="channels" if cost is None else cost)


@pytest.mark.parametrize("target_sparsity", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("seed,n", [(0, 1000), (1, 300)])
def test_toy_optimisation_reaches_target_and_polarizes(target_sparsity, seed, n):
    _, stats = optimise_scores(target_sparsity, n=n, seed=seed)
    assert abs(stats["density"] - (1 - target_sparsity)) <= 0.01, stats["density"]
    assert stats["polarized"] >= 0.99, stats["polarized"]
    assert abs(stats["soft_density"] - stats["density"]) <= 0.01


@pytest.mark.parametrize("target_sparsity", [0.3, 0.7])
def test_toy_optimisation_with_cost_weights(target_sparsity):
    gen = torch.Generator().manual_seed(5)
    cost = torch.rand(800, generator=gen) * 9 + 1  # channels of unequal cost
    _, stats = optimise_scores(target_sparsity, n=800, cost=cost)
    assert abs(stats["density"] - (1 - target_sparsity)) <= 0.01, stats["density"]
    assert stats["polarized"] >= 0.99


@pytest.mark.parametrize("target_sparsity", [0.3, 0.7])
def test_toy_optimisation_zhuang_form(target_sparsity):
    _, stats = optimise_scores(target_sparsity, polarization="zhuang")
    assert abs(stats["density"] - (1 - target_sparsity)) <= 0.01, stats["density"]
    assert stats["polarized"] >= 0.99


def test_loss_matches_functional_and_reports_terms():
    model = SmallNet()
    pp.bind_gates(model)
    loss_fn = pp.PolarizationLoss(0.4, polarization="zhuang", t=1.1, target_weight=3.0, polarization_weight=0.5)
    loss = loss_fn(model)
    ref, terms = pp.functional.gate_penalty(
        model.polarprune_bank.scores, target_sparsity=0.4, target_weight=3.0,
        polarization_weight=0.5, polarization="zhuang", t=1.1)
    torch.testing.assert_close(loss.detach().as_subclass(torch.Tensor), ref.detach())
    got = loss_fn.terms()
    assert got["density"] == pytest.approx(terms[0].item())
    assert got["nonfinite"] == 0
    loss.backward()
    assert model.polarprune_bank.scores.grad.abs().sum() > 0


def test_schedule_scales_weights_and_step_counter_advances():
    gate = pp.ChannelGate(10, init=randn(10))
    loss_fn = pp.PolarizationLoss(0.5, schedule=pp.ramp(warmup_steps=2, ramp_steps=4))
    values = [float(loss_fn(gate).detach()) for _ in range(8)]
    assert values[0] == 0.0 and values[1] == 0.0
    assert 0 < values[2] < values[3] < values[4] < values[5]
    assert values[5] == pytest.approx(values[7])
    assert loss_fn.step == 8
    loss_fn.eval()
    loss_fn(gate)
    assert loss_fn.step == 8
    assert loss_fn.weights(3) == pytest.approx((loss_fn.target_weight * 0.5, loss_fn.polarization_weight * 0.5))
    split = pp.PolarizationLoss(0.5, schedule=lambda step: (1.0, 0.0))
    assert split.weights(0) == (split.target_weight, 0.0)


def test_nonfinite_scores_raise_when_value_is_read():
    model = SmallNet()
    bank = pp.bind_gates(model)
    with torch.no_grad():
        bank.scores[9] = float("nan")
        bank.scores[10] = float("inf")
    loss_fn = pp.PolarizationLoss(0.5)
    penalty = loss_fn(model)                       # no error yet: nothing was read
    total = model(randn(2, 3, 4, 4)).logsumexp(1).mean() + penalty
    total.backward()                                # still fine: no read
    for read in (lambda: total.item(), lambda: float(penalty), lambda: f"{total:.3f}", lambda: penalty.tolist()):
        with pytest.raises(pp.NonFiniteGateError, match=r"gate2 \(2 of 6\)"):
            read()


def test_finite_penalty_reads_normally():
    gate = pp.ChannelGate(6, init=randn(6))
    penalty = pp.PolarizationLoss(0.5)(gate)
    assert isinstance(penalty, pp.PenaltyValue)
    assert penalty.item() == pytest.approx(float(penalty))
    assert f"{penalty:.4f}" == f"{penalty.item():.4f}"
    assert (penalty * 2).item() == pytest.approx(2 * penalty.item())
    assert isinstance(pp.PolarizationLoss(0.5, guard=False)(gate), torch.Tensor)


class RecordReads(torch.overrides.TorchFunctionMode):
    """Records calls that copy a value to the host (item, bool, tolist, ...)."""

    READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.numpy, torch.Tensor.cpu, torch.nonzero, torch.Tensor.nonzero}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


def test_training_step_reads_nothing_from_the_device():
    model = SmallNet()
    pp.bind_gates(model)
    loss_fn = pp.PolarizationLoss(0.5, schedule=pp.ramp(1, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = randn(4, 3, 6, 6), torch.randint(0, 4, (4,))
    loss_fn(model)  # warm up lazily built cost vectors
    with RecordReads() as rec:
        for _ in range(2):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y) + loss_fn(model)
            loss.backward()
            opt.step()
    assert rec.reads == []


def test_gate_stats_values():
    model = SmallNet(c1=4, c2=4)
    bank = pp.bind_gates(model)
    with torch.no_grad():
        bank.scores.copy_(torch.tensor([5.0, -5.0, 0.1, -0.1, 5.0, 5.0, 5.0, -5.0]))
    stats = pp.gate_stats(model)
    assert stats["num_gates"] == 8 and stats["open"] == 5
    assert stats["density"] == pytest.approx(5 / 8)
    assert stats["polarized"] == pytest.approx(6 / 8)
    assert stats["layers"] == {"bn1": {"open": 2, "total": 4}, "gate2": {"open": 3, "total": 4}}
    bank.set_cost("macs", torch.tensor([1.0, 1, 1, 1, 3, 3, 3, 3]))
    assert pp.gate_stats(model, cost="macs")["density"] == pytest.approx((1 + 1 + 9) / 16)
    with torch.no_grad():
        bank.scores[0] = float("-inf")
    with pytest.raises(pp.NonFiniteGateError, match=r"bn1 \(1 of 4\)"):
        pp.gate_stats(model)
    with pytest.raises(pp.NonFiniteGateError):
        bank.check_finite()
