"""Block (layer) gates: one gate per residual branch, learned with the channel gates, removed at extraction."""
import copy
import json
import warnings

import pytest
import torch
import torchvision
from torch import nn

from helpers import block_segments, pick_closed, set_gates
import polarprune_cuda as pp
from polarprune_cuda.surgery.blocks import ClosedBlock
from helpers import assert_outputs_match, randomize_bn

MODELS = {
    "cifar_resnet20": (lambda: pp.resnet20(), (2, 3, 32, 32)),
    "cifar_resnet56": (lambda: pp.resnet56(), (2, 3, 16, 16)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), (2, 3, 64, 64)),
}
DEPTH = {"cifar_resnet20": 20, "cifar_resnet56": 56, "resnet18": 18, "resnet50": 50}
BLOCKS = {"cifar_resnet20": 9, "cifar_resnet56": 27, "resnet18": 8, "resnet50": 16}


@pytest.mark.parametrize("channels", [True, False], ids=["channels+blocks", "blocks-only"])
@pytest.mark.parametrize("name", list(MODELS))
def test_closed_blocks_extract_exactly(name, channels, tmp_path):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = randomize_bn(make()).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        dense_out = model(x)
    dense_count = pp.count(model, x)
    assert pp.depth(model, x) == DEPTH[name]
    pp.attach_gates(model, x, min_channels=1, blocks=True, channels=channels)
    blocks = block_segments(model)
    assert len(blocks) == BLOCKS[name]
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense_out, rtol=0, atol=0)   # every gate open: unchanged
    closed = pick_closed(list(blocks), seed=3)
    set_gates(model, seed=1, closed_blocks=closed)
    assert set(pp.removed_blocks(model)) == closed
    with torch.no_grad():
        gated_out = model(x)
    small = pp.extract(model, x)
    with torch.no_grad():
        small_out = small.eval()(x)
    assert_outputs_match(gated_out, small_out)

    # closed blocks became their shortcut, nothing else did
    replaced = {n for n, m in small.named_modules() if isinstance(m, ClosedBlock)}
    assert replaced == closed
    # MACs, params and depth as predicted from the gates
    got = pp.count(small, x)
    assert got == pp.predicted_count(model)
    assert got["macs"] < dense_count["macs"]
    assert pp.depth(small, x) == pp.predicted_depth(model) < DEPTH[name]
    assert small.polarprune_spec["removed_blocks"] == sorted(closed, key=list(blocks).index)

    # save / load: the spec records the removed blocks; outputs bit-identical
    pp.save_pruned(small, tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "spec.json").read_text())
    assert {b["name"] for b in spec["blocks"] if b["closed"]} == closed
    loaded = pp.load_pruned(tmp_path / "m", make).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small_out, rtol=0, atol=0)
    assert {n for n, m in loaded.named_modules() if isinstance(m, ClosedBlock)} == closed
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), small.state_dict().values()))


def test_block_gate_scales_the_branch_only():
    """Closing one block gate (channel gates open) equals the model with that block replaced by act(shortcut)."""
    torch.manual_seed(0)
    model = randomize_bn(pp.resnet20()).eval()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16)
    pp.attach_gates(model, x, blocks=True)
    bank = model.polarprune_bank
    for name in ("layer1.1", "layer2.0", "layer3.2"):     # identity and projection shortcuts
        seg = block_segments(model)[name]
        with torch.no_grad():
            bank.scores.fill_(1.0)
            bank.segment_scores(seg).fill_(-1.0)
            out = model(x)
        expected = copy.deepcopy(reference)
        parent, _, child = name.rpartition(".")
        block = expected.get_submodule(name)
        setattr(expected.get_submodule(parent), child, ClosedBlock.from_block(block, "shortcut", "relu"))
        with torch.no_grad():
            torch.testing.assert_close(out, expected(x), rtol=0, atol=0)


def branch_cost(block, x_block):
    """MACs and params of a block's branch, counted from its layers' shapes (independent of cost.py)."""
    macs = params = 0
    shortcut = set(block.shortcut.modules())
    outs = {}
    hooks = [m.register_forward_hook(lambda m, a, o: outs.__setitem__(m, o.shape)) for m in block.modules()]
    with torch.no_grad():
        block(x_block)
    for h in hooks:
        h.remove()
    for m in block.modules():
        if m in shortcut:
            continue
        if isinstance(m, nn.Conv2d):
            macs += outs[m][2] * outs[m][3] * m.weight.numel()
            params += m.weight.numel()
        elif isinstance(m, nn.BatchNorm2d):
            params += 2 * m.num_features
    return macs, params


def test_block_gate_costs_its_branch_and_inner_gates_stop_counting():
    torch.manual_seed(0)
    model = pp.resnet20().eval()
    x = torch.randn(1, 3, 32, 32)
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0]))
             for n in ("layer1.1", "layer2.0")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    expected = {n: branch_cost(copy.deepcopy(model.get_submodule(n)), inputs[n]) for n in inputs}
    pp.attach_gates(model, x, blocks=True)
    bank = model.polarprune_bank
    dense = bank.surgery.dense
    blocks = block_segments(model)
    for name, (macs, params) in expected.items():
        keep = torch.ones_like(bank.scores)
        keep[bank.offsets[blocks[name]]] = 0
        eff = bank.effective(keep)
        assert bank.cost_model("macs").cost(eff).item() == pytest.approx(dense["macs"] - macs, abs=1e-3)
        assert bank.cost_model("params").cost(eff).item() == pytest.approx(dense["params"] - params, abs=1e-3)
        # channel gates inside the closed branch no longer change the cost
        inner = [k for k, b in enumerate(bank.block_of) if b == blocks[name]]
        assert inner, "the block's inner channel group must be a segment inside it"
        keep2 = keep.clone()
        for k in inner:
            keep2[bank.offsets[k]: bank.offsets[k] + bank.sizes[k]] = 0
        assert bank.cost_model("macs").cost(bank.effective(keep2)).item() == pytest.approx(
            bank.cost_model("macs").cost(eff).item(), abs=1e-3)


def test_penalty_sees_effective_probabilities_and_gradients_stay_finite():
    torch.manual_seed(0)
    model = pp.resnet20()
    x = torch.randn(2, 3, 16, 16)
    pp.attach_gates(model, x, blocks=True)
    bank = model.polarprune_bank
    with torch.no_grad():
        bank.scores.copy_(torch.randn(bank.scores.shape) * 3)
        bank.scores[0], bank.scores[-1] = 1e4, -1e4       # saturated gates
    # independent effective probabilities: p_j * p_block for gates inside a block
    def effective_p(scores):
        p = torch.sigmoid(scores.double())
        parts = []
        for k, b in enumerate(bank.block_of):
            chunk = p[bank.offsets[k]: bank.offsets[k] + bank.sizes[k]]
            parts.append(chunk * p[bank.offsets[b]] if b >= 0 else chunk)
        return torch.cat(parts)

    for cost in ("channels", "params", "macs"):
        loss = pp.PolarizationLoss(0.5, cost=cost)
        value = loss(model)
        value.backward()
        cm = bank.cost_model(cost)
        scores = bank.scores.detach().clone().requires_grad_(True)
        p_eff = effective_p(scores)
        assert loss.terms()["density"] == pytest.approx(float(cm.density(p_eff.detach())), rel=1e-5)
        assert torch.isfinite(bank.scores.grad).all()
        # the same loss written directly in p_j * p_block (bimodal polarizer, default weights)
        expected = 20.0 * (cm.density(p_eff) - 0.5) ** 2 + 0.1 * (4 * p_eff * (1 - p_eff)).mean()
        assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
        (grad,) = torch.autograd.grad(expected, scores)
        torch.testing.assert_close(bank.scores.grad.double(), grad.double(), rtol=1e-3, atol=1e-7)
        bank.scores.grad = None


def test_blocks_only_keeps_the_fused_penalty():
    torch.manual_seed(0)
    model = pp.resnet20()
    x = torch.randn(2, 3, 16, 16)
    pp.attach_gates(model, x, blocks=True, channels=False)
    bank = model.polarprune_bank
    assert bank.fusable() and bank.sizes == [1] * 9
    loss = pp.PolarizationLoss(0.5, cost="macs")
    loss.arm(model)
    model(x)
    assert bank._terms is not None          # computed with the gates, in the forward pass
    fused = loss(model)
    loss2 = pp.PolarizationLoss(0.5, cost="macs", fuse=False)
    torch.testing.assert_close(fused.as_subclass(torch.Tensor), loss2(model).as_subclass(torch.Tensor))
    # with channel gates inside branches, the penalty is computed on effective scores, not fused
    both = pp.resnet20()
    pp.attach_gates(both, x, blocks=True)
    assert not both.polarprune_bank.fusable()


def test_training_step_moves_block_gates():
    torch.manual_seed(0)
    model = pp.resnet20()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    pp.attach_gates(model, x, blocks=True)
    bank = model.polarprune_bank
    loss = nn.functional.cross_entropy(model(x), y) + pp.PolarizationLoss(0.5, cost="macs")(model)
    loss.backward()
    block_grads = torch.stack([bank.scores.grad[bank.offsets[b.segment]] for b in bank.surgery.blocks])
    assert (block_grads != 0).all()


class NotABlock(nn.Module):
    """Looks like a block (shortcut, relu, bn) but adds a constant after the BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()

    def forward(self, x):
        return self.relu(self.bn1(self.conv1(x)) + 1.0 + self.shortcut(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.odd = NotABlock()
        self.good = pp.models.BasicBlock(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.good(self.odd(torch.relu(self.bn(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def test_blocks_that_do_not_close_exactly_are_skipped_or_refused():
    x = torch.randn(2, 3, 8, 8)
    model = Net()
    with pytest.warns(UserWarning, match="'odd'.*not block-gated"):
        pp.attach_gates(model, x, blocks=True)
    assert [b.name for b in model.polarprune_bank.surgery.blocks] == ["good"]
    with pytest.raises(ValueError, match="'odd'.*not block-gated"):
        pp.attach_gates(Net(), x, blocks=["odd"])


def test_block_argument_errors():
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="blocks names 'conv1'.*not a residual block"):
        pp.attach_gates(pp.resnet20(), x, blocks=["conv1"])
    with pytest.raises(ValueError, match="blocks names 'nope'"):
        pp.attach_gates(pp.resnet20(), x, blocks=["nope"])
    with pytest.raises(ValueError, match="blocks is an empty list"):
        pp.attach_gates(pp.resnet20(), x, blocks=[])
    with pytest.raises(TypeError, match="blocks must be True, False or a list"):
        pp.attach_gates(pp.resnet20(), x, blocks="layer1.0")
    with pytest.raises(ValueError, match="channels=False needs blocks"):
        pp.attach_gates(pp.resnet20(), x, channels=False)
    with pytest.raises(pp.UnsupportedModelError, match="no residual block"):
        pp.attach_gates(torchvision.models.vgg11_bn(num_classes=10), x, blocks=True)
    model = pp.resnet20()
    pp.attach_gates(model, x)
    with pytest.raises(ValueError, match="without blocks"):
        pp.predicted_depth(model)


def test_named_blocks_only():
    x = torch.randn(1, 3, 16, 16)
    model = pp.resnet20()
    pp.attach_gates(model, x, blocks=["layer2.1", "layer3.0"], channels=False)
    assert [b.name for b in model.polarprune_bank.surgery.blocks] == ["layer2.1", "layer3.0"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = pp.extract(model, x)
    assert not any(isinstance(m, ClosedBlock) for m in small.modules())


def test_load_refuses_a_spec_whose_block_is_missing(tmp_path):
    x = torch.randn(1, 3, 16, 16)
    model = pp.resnet20()
    pp.attach_gates(model, x, blocks=True, channels=False)
    with torch.no_grad():
        model.polarprune_bank.segment_scores(block_segments(model)["layer3.2"]).fill_(-1)
    pp.save_pruned(pp.extract(model, x), tmp_path / "m")
    with pytest.raises(ValueError, match="block 'layer3.2' of the spec is not in the model"):
        pp.load_pruned(tmp_path / "m", lambda: pp.models.CifarResNet(14))


def test_block_gates_step_as_if_alone():
    from polarprune_cuda import train

    torch.manual_seed(0)
    model = pp.resnet20()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    pp.attach_gates(model, x, blocks=True)
    bank = model.polarprune_bank
    loss_fn = pp.PolarizationLoss(0.5, cost="macs")

    def grad():
        bank.scores.grad = None
        model.eval()   # same BatchNorm statistics on every call
        (nn.functional.cross_entropy(model(x), y) + loss_fn(model, step=0)).backward()
        return bank.scores.grad.clone()

    plain = grad()
    for _ in range(2):   # installed once, however often the optimizer is made
        train.make_optimizer(model, 0.1)
        scaled = grad()
    blocks = [bank.offsets[b.segment] for b in bank.surgery.blocks]
    mask = torch.zeros_like(plain, dtype=torch.bool)
    mask[blocks] = True
    torch.testing.assert_close(scaled[~mask], plain[~mask], rtol=0, atol=0)
    torch.testing.assert_close(scaled[mask], plain[mask] * len(blocks) / bank.scores.numel())


def test_block_gate_on_a_branch_whose_channels_are_not_gated():
    """The residual group of stage 1 is ignored: its BatchNorms carry the block gate alone."""
    torch.manual_seed(0)
    model = randomize_bn(pp.resnet20()).eval()
    x = torch.randn(2, 3, 16, 16)
    pp.attach_gates(model, x, min_channels=1, blocks=True, ignored_layers=["conv1"])
    bn = model.layer1[1].bn2
    assert bn._repeat == 16 and bn._segment == block_segments(model)["layer1.1"]
    set_gates(model, seed=1, closed_blocks={"layer1.1", "layer2.2"})
    with torch.no_grad():
        gated = model(x)
    small = pp.extract(model, x)
    with torch.no_grad():
        assert_outputs_match(gated, small(x))
    assert pp.count(small, x) == pp.predicted_count(model)
    assert pp.depth(small, x) == pp.predicted_depth(model) == 16
