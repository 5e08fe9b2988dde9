"""Gate modules and the gate bank."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import polarprune_cuda as pp

from helpers import SmallNet, randn


class CountOps(TorchDispatchMode):
    """Counts calls of each polarprune op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("polarprune."):
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("training", [True, False])
def test_gated_batchnorm_all_open_equals_batchnorm(training):
    bn = torch.nn.BatchNorm2d(11)
    with torch.no_grad():
        bn.weight.copy_(randn(11))
        bn.bias.copy_(randn(11))
        bn.running_mean.copy_(randn(11))
        bn.running_var.copy_(torch.rand(11) + 0.5)
    gbn = pp.GatedBatchNorm2d(11)
    gbn.load_state_dict(bn.state_dict(), strict=False)
    bn.train(training)
    gbn.train(training)
    x = randn(4, 11, 5, 5)
    torch.testing.assert_close(gbn(x), bn(x))
    torch.testing.assert_close(gbn.running_mean, bn.running_mean)
    torch.testing.assert_close(gbn.running_var, bn.running_var)
    assert isinstance(gbn, torch.nn.BatchNorm2d)


@pytest.mark.parametrize("training", [True, False])
def test_gated_batchnorm_closed_channels_are_exact_zeros(training):
    init = randn(13)
    gbn = pp.GatedBatchNorm2d(13, init=init).train(training)
    with torch.no_grad():
        gbn.bias.copy_(randn(13))
    y = gbn(randn(3, 13, 4, 4))
    closed = init <= 0
    assert closed.any() and (~closed).any()
    assert torch.count_nonzero(y[:, closed]) == 0
    open_out = y[:, ~closed]
    assert torch.count_nonzero(open_out) == open_out.numel()


def test_gated_batchnorm_from_batchnorm_shares_parameters():
    bn = torch.nn.BatchNorm2d(5).eval()
    gbn = pp.GatedBatchNorm2d.from_batchnorm(bn, init=2.0)
    assert gbn.weight is bn.weight and gbn.running_var is bn.running_var
    assert not gbn.training
    x = randn(2, 5, 3, 3)
    torch.testing.assert_close(gbn(x), bn(x))


def test_channel_gate_module_matches_functional():
    init = randn(7)
    gate = pp.ChannelGate(7, init=init, ste="sigmoid", tau=0.5)
    x = randn(2, 7, 3, 3, channels_last=True)
    y = gate(x)
    torch.testing.assert_close(y, x * (init > 0).float().view(1, -1, 1, 1))
    assert y.is_contiguous(memory_format=torch.channels_last)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_bound_bank_matches_loose_modules_and_calls_one_gate_op_each_way():
    torch.manual_seed(3)
    loose = SmallNet()
    bound = copy.deepcopy(loose)
    bank = pp.bind_gates(bound)
    assert bank.scores.numel() == 8 + 6 and bank.names == ["bn1", "gate2"]
    assert not hasattr(bound.bn1, "gate_scores")
    x = randn(2, 3, 6, 6)
    y_loose = loose(x)
    y_loose.square().sum().backward()
    with CountOps() as counter:
        y_bound = bound(x)
        forward_counts = dict(counter.counts)
        y_bound.square().sum().backward()
    torch.testing.assert_close(y_bound, y_loose)
    assert forward_counts["polarprune.binary_gate"] == 1
    assert counter.counts["polarprune.binary_gate"] == 1
    assert counter.counts["polarprune.binary_gate_backward"] == 1
    expected = torch.cat([loose.bn1.gate_scores.grad, loose.gate2.gate_scores.grad])
    torch.testing.assert_close(bank.scores.grad, expected)
    g_loose, g_bound = _grads(loose), _grads(bound)
    for name in ("conv1.weight", "bn1.weight", "conv2.weight", "fc.weight"):
        torch.testing.assert_close(g_bound[name], g_loose[name])


def test_bank_cache_is_cleared_after_forward_even_on_error():
    model = SmallNet()
    bank = pp.bind_gates(model)
    model(randn(1, 3, 4, 4))
    assert bank._cache is None and not bank._active
    with pytest.raises(RuntimeError):
        model(randn(1, 5, 4, 4))  # wrong input channels
    assert bank._cache is None and not bank._active


def test_two_forwards_before_backward():
    model = SmallNet()
    bank = pp.bind_gates(model)
    x = randn(2, 3, 4, 4)
    (model(x).sum() + model(x).sum()).backward()
    assert bank.scores.grad is not None and torch.isfinite(bank.scores.grad).all()


def test_bank_groups_share_one_segment():
    model = SmallNet(c1=6, c2=6)
    pp.bind_gates(model, groups=[["bn1", "gate2"]])
    bank = pp.find_bank(model)
    assert bank.names == ["bn1"] and bank.scores.numel() == 6
    assert torch.equal(model.bn1.gate(), model.gate2.gate())
    with pytest.raises(ValueError, match="channel-count mismatch"):
        pp.bind_gates(SmallNet(c1=8, c2=6), groups=[["bn1", "gate2"]])


def test_bound_model_state_dict_roundtrip_and_deepcopy():
    model = SmallNet()
    pp.bind_gates(model)
    state = model.state_dict()
    assert "polarprune_bank.scores" in state and "conv1.weight" in state
    other = SmallNet()
    pp.bind_gates(other)
    other.load_state_dict(state)
    x = randn(2, 3, 5, 5)
    torch.testing.assert_close(other(x), model(x))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.polarprune_bank.scores.fill_(-1.0)
    assert clone.bn1.bank is clone.polarprune_bank
    assert torch.count_nonzero(clone.bn1.gate()) == 0
    assert torch.count_nonzero(model.bn1.gate()) > 0


def test_bind_errors():
    with pytest.raises(ValueError, match="no gate modules"):
        pp.bind_gates(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)))
    model = SmallNet()
    pp.bind_gates(model)
    with pytest.raises(ValueError, match="already has a gate bank"):
        pp.bind_gates(model)
    mixed = SmallNet()
    mixed.gate2.ste = "sigmoid"
    with pytest.raises(ValueError, match="disagree"):
        pp.bind_gates(mixed)
    with pytest.raises(ValueError, match="not a gate module"):
        pp.bind_gates(SmallNet(), groups=[["bn1", "nope"]])


def test_bank_cost_kinds():
    model = SmallNet()
    bank = pp.bind_gates(model)
    assert torch.equal(bank.cost_model("channels").linear, torch.ones(14))
    assert bank.cost_model("channels").total == 14
    with pytest.raises(ValueError, match="macs"):
        bank.cost_model("macs")
    bank.set_cost("macs", torch.arange(1.0, 15.0))
    assert bank.cost_model("macs").linear[3] == 4.0
    assert bank.cost_kinds == ["channels", "macs"]
    with pytest.raises(ValueError, match="shape"):
        bank.set_cost("params", torch.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        bank.set_cost("params", -torch.ones(14))


def test_armed_bank_fuses_gates_and_penalty_into_one_launch_each_way():
    torch.manual_seed(4)
    fused_model = SmallNet()
    plain_model = copy.deepcopy(fused_model)
    pp.bind_gates(fused_model)
    pp.bind_gates(plain_model)
    fused_loss, plain_loss = pp.PolarizationLoss(0.5, polarization="zhuang"), pp.PolarizationLoss(
        0.5, polarization="zhuang", fuse=False)
    x = randn(2, 3, 6, 6)
    fused_loss(fused_model)   # arms the bank; from the next forward on the terms come with the gates
    with CountOps() as counter:
        out = fused_model(x).square().sum() + fused_loss(fused_model)
        forward_counts = dict(counter.counts)
        out.backward()
    # on CPU fp32 the gated BatchNorm affine runs the reference under plain autograd (no op call; see
    # test_gated_affine_plain_path_equals_the_op)
    assert forward_counts == {"polarprune.gate_bank": 1, "polarprune.channel_gate": 1}
    assert counter.counts["polarprune.gate_bank_backward"] == 1
    assert "polarprune.gate_penalty" not in counter.counts and "polarprune.binary_gate" not in counter.counts
    ref = plain_model(x).square().sum() + plain_loss(plain_model)
    ref.backward()
    torch.testing.assert_close(out.detach().as_subclass(torch.Tensor), ref.detach().as_subclass(torch.Tensor))
    torch.testing.assert_close(fused_model.polarprune_bank.scores.grad, plain_model.polarprune_bank.scores.grad)
    # the terms are taken once: a second call recomputes them (no stale graph)
    again = fused_loss(fused_model)
    torch.testing.assert_close(again.detach().as_subclass(torch.Tensor),
                               plain_loss(plain_model).detach().as_subclass(torch.Tensor))
    copy.deepcopy(fused_model)   # a model holding the terms of a forward pass can still be copied


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gated_affine_plain_path_equals_the_op(dtype):
    """ops.gated_affine's plain-autograd path (torch backend, eager) gives the op's values and gradients bit for bit."""
    torch.manual_seed(0)
    w, b = randn(13, dtype=dtype), randn(13, dtype=dtype)
    gate = (torch.rand(13) > 0.4).to(dtype) + torch.zeros(13, dtype=dtype)
    dw, db = randn(13, dtype=dtype), randn(13, dtype=dtype)
    grads = []
    for fn in (pp.ops.gated_affine, pp.ops.ALL_OPS["gated_affine"]):
        leaves = [t.clone().requires_grad_() for t in (w, b, gate)]
        with CountOps() as counter:
            gw, gb = fn(*leaves)
            torch.autograd.backward([gw, gb], [dw, db])
        grads.append(([gw.detach(), gb.detach()] + [t.grad for t in leaves], dict(counter.counts)))
    (plain, plain_ops), (op, op_ops) = grads
    for a, c in zip(plain, op):
        assert torch.equal(a, c)
    assert plain_ops == {} and op_ops == {"polarprune.gated_affine": 1, "polarprune.gated_affine_backward": 1}


def test_gated_affine_uses_the_op_for_half_precision_and_forced_backends(monkeypatch):
    w, b = randn(5).half(), randn(5).half()
    gate = torch.ones(5, dtype=torch.float16)
    with CountOps() as counter:
        pp.ops.gated_affine(w, b, gate)
    assert counter.counts == {"polarprune.gated_affine": 1}     # fp32 accumulation of the gate's gradient
    monkeypatch.setenv("POLARPRUNE_BACKEND", "torch")
    with CountOps() as counter:
        pp.ops.gated_affine(w.float(), b.float(), gate.float())
    assert counter.counts == {}                                 # forcing the reference: still the reference
