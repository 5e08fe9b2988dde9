"""attach_gates / extract / save_pruned / load_pruned on real architectures."""
import copy
import json

import pytest
import torch
import torchvision
from torch import nn

from helpers import assert_outputs_match, randomize_bn
import polarprune_cuda as pp

MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), (2, 3, 64, 64)),
    "resnext50_32x4d": (lambda: torchvision.models.resnext50_32x4d(num_classes=10), (2, 3, 64, 64)),
    "wide_resnet50_2": (lambda: torchvision.models.wide_resnet50_2(num_classes=10), (2, 3, 64, 64)),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(num_classes=10), (2, 3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 64, 64)),
    "cifar_resnet20": (lambda: pp.resnet20(), (2, 3, 32, 32)),
    "cifar_resnet32": (lambda: pp.resnet32(), (2, 3, 32, 32)),
    "cifar_resnet44": (lambda: pp.resnet44(), (2, 3, 32, 32)),
    "cifar_resnet56": (lambda: pp.resnet56(), (2, 3, 32, 32)),
    "cifar_resnet110": (lambda: pp.resnet110(num_classes=100), (2, 3, 32, 32)),
}


def close_random(model, seed, low=0.3, high=0.6):
    """Close a random 30-60% of each group's gates."""
    gen = torch.Generator().manual_seed(seed)
    bank = model.polarprune_bank
    with torch.no_grad():
        for scores in bank.scores.split(bank.sizes):
            frac = low + (high - low) * torch.rand(1, generator=gen).item()
            n_closed = max(1, round(frac * scores.numel())) if scores.numel() > 1 else 0
            perm = torch.randperm(scores.numel(), generator=gen)
            values = torch.rand(scores.numel(), generator=gen) + 0.1
            values[perm[:n_closed]] *= -1
            scores.copy_(values)


@pytest.mark.parametrize("name", list(MODELS))
def test_attach_close_extract_save_load(name, tmp_path):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = randomize_bn(make()).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        dense_out = model(x)
    keys_before = set(model.state_dict())
    pp.attach_gates(model, x, min_channels=1)
    assert set(model.state_dict()) - keys_before == {"polarprune_bank.scores"}
    assert keys_before <= set(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense_out, rtol=0, atol=0)   # all gates open: unchanged
    close_random(model, seed=1)
    with torch.no_grad():
        gated_out = model(x)
    small = pp.extract(model, x)
    assert not any(isinstance(m, (pp.GateBank, pp.gates.modules.GateMixin)) for m in small.modules())
    with torch.no_grad():
        small_out = small.eval()(x)
    assert_outputs_match(gated_out, small_out)
    got = pp.count(small, x)
    assert got == pp.predicted_count(model)
    dense = pp.count(make(), x)
    assert got["macs"] < dense["macs"] and got["params"] < dense["params"]
    pp.save_pruned(small, tmp_path / "pruned")
    spec = json.loads((tmp_path / "pruned" / "spec.json").read_text())
    assert spec["version"] == pp.__version__ and spec["input_shapes"] == [list(shape)]
    assert all(set(g) >= {"name", "root", "channels", "kept"} for g in spec["groups"])
    again = pp.load_pruned(tmp_path / "pruned", make).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), small_out, rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_open_gates_do_not_change_outputs(training):
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10))
    plain = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    pp.attach_gates(model, x)
    model.train(training)
    plain.train(training)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    for (name, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_macs_sparsity_equals_loss_cost_model_prediction():
    torch.manual_seed(0)
    model = randomize_bn(pp.resnet32()).eval()
    x = torch.randn(1, 3, 32, 32)
    dense = pp.count(model, x)
    pp.attach_gates(model, x, min_channels=1)
    close_random(model, seed=3)
    loss_fn = pp.PolarizationLoss(0.5, cost="macs")
    hard = (model.polarprune_bank.scores.detach() > 0).float()
    predicted_sparsity = 1 - loss_fn.cost_model(model).density(hard).item()
    achieved = 1 - pp.count(pp.extract(model, x), x)["macs"] / dense["macs"]
    assert achieved == pytest.approx(predicted_sparsity, abs=1e-9)
    params_pred = 1 - pp.PolarizationLoss(0.5, cost="params").cost_model(model).density(hard).item()
    assert 1 - pp.count(pp.extract(model, x), x)["params"] / dense["params"] == pytest.approx(params_pred, abs=1e-9)


def test_loss_with_macs_cost_trains_the_bank():
    torch.manual_seed(0)
    model = pp.resnet20()
    x = torch.randn(2, 3, 32, 32)
    pp.attach_gates(model, x)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 2])) + pp.PolarizationLoss(0.5, cost="macs")(model)
    loss.backward()
    assert model.polarprune_bank.scores.grad.abs().sum() > 0
    stats = pp.gate_stats(model, cost="macs")
    assert stats["density"] == 1.0 and stats["soft_density"] < 1.0


def test_guard_keeps_min_channels_with_warning():
    model = pp.resnet20().eval()
    x = torch.randn(1, 3, 32, 32)
    pp.attach_gates(model, x, min_channels=4)
    bank = model.polarprune_bank
    with torch.no_grad():
        bank.scores.fill_(1.0)
        first = bank.scores[: bank.sizes[0]]
        first.copy_(-torch.arange(1.0, bank.sizes[0] + 1))   # whole group closed; -1 scores highest
        gated_out = model(x)
    with pytest.warns(UserWarning, match="below min_channels=4"):
        small = pp.extract(model, x)
    root = small.get_submodule(bank.surgery.groups[0].root)
    assert root.out_channels == 4
    assert bank.surgery.groups[0].root == "conv1"
    kept = small.polarprune_spec["groups"][0]["kept"]
    assert kept == [0, 1, 2, 3]   # the highest-scoring closed channels
    assert_outputs_match(gated_out, small.eval()(x))


def test_round_to_gives_multiples():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    pp.attach_gates(model, x, min_channels=1, round_to=8)
    close_random(model, seed=5)
    with torch.no_grad():
        gated_out = model(x)
    small = pp.extract(model, x)
    for m in small.modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels % 8 == 0, m
    assert_outputs_match(gated_out, small.eval()(x))


def test_a_model_moved_to_float64_after_attach_gates_extracts_in_float64():
    """Torch-Pruning traces the copy with inputs of the model's own dtype, not the float32 recorded at attach."""
    model = pp.resnet20(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    pp.attach_gates(model, x[:1], min_channels=1)
    close_random(model, seed=3)
    model = model.double()
    with torch.no_grad():
        gated_out = model(x.double())
    small = pp.extract(model, x[:1].double())
    assert {p.dtype for p in small.parameters()} == {torch.float64}
    with torch.no_grad():
        assert torch.allclose(small.eval()(x.double()), gated_out, atol=1e-10, rtol=0)


def test_ignored_layers_and_classifier_are_not_gated():
    model = pp.resnet20()
    x = torch.randn(1, 3, 32, 32)
    pp.attach_gates(model, x, ignored_layers=["layer3.0.conv1"])
    assert type(model.layer3[0].bn1) is nn.BatchNorm2d
    assert isinstance(model.layer3[0].bn2, pp.GatedBatchNorm2d)
    assert type(model.fc) is nn.Linear
    assert "fc" not in model.polarprune_bank.names


def test_spec_mismatch_names_the_module(tmp_path):
    model = pp.resnet20().eval()
    x = torch.randn(1, 3, 32, 32)
    pp.attach_gates(model, x, min_channels=1)
    close_random(model, seed=2)
    pp.save_pruned(pp.extract(model, x), tmp_path / "p")
    with pytest.raises(ValueError, match="spec does not match the model: 'layer1.3.conv1' has 'layer1.3.conv1.weight'"):
        pp.load_pruned(tmp_path / "p", lambda: pp.resnet32())
    with pytest.raises(ValueError, match="spec does not match the model: module 'conv1' has 32"):
        pp.load_pruned(tmp_path / "p", lambda: pp.models.CifarResNet(20, width=32))
    spec = json.loads((tmp_path / "p" / "spec.json").read_text())
    spec["groups"][0]["root"] = "stem"
    (tmp_path / "p" / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="spec.json was changed or damaged after it was written"):
        pp.load_pruned(tmp_path / "p", pp.resnet20)
    spec["sha256"] = pp.surgery.spec_digest(spec)   # an edit with its digest recomputed reaches the model check
    (tmp_path / "p" / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="module 'stem' of the spec is not in the model"):
        pp.load_pruned(tmp_path / "p", pp.resnet20)


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class CustomFnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = _Double.apply(self.bn(self.conv(x)))
        return self.fc(self.conv2(x).mean((2, 3)))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.gn(self.conv(x)).mean((2, 3)))


class ShiftNet(nn.Module):
    """Adds a constant after a gated conv: closed channels would not stay zero."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv2(self.conv(x) + 1.0).mean((2, 3)))


def test_custom_autograd_function_is_refused_by_name():
    with pytest.raises(pp.UnsupportedModelError, match="_DoubleBackward.*'conv'"):
        pp.attach_gates(CustomFnNet(), torch.randn(1, 3, 8, 8))


def test_unsupported_norm_is_refused_by_name():
    with pytest.raises(pp.UnsupportedModelError, match="gn \\(GroupNorm\\)"):
        pp.attach_gates(GroupNormNet(), torch.randn(1, 3, 8, 8))


def test_wrong_extraction_is_never_returned():
    model = ShiftNet().eval()
    x = torch.randn(1, 3, 8, 8)
    pp.attach_gates(model, x, min_channels=1)
    with torch.no_grad():
        model.polarprune_bank.scores[:3] = -1.0
    with pytest.raises(pp.UnsupportedModelError, match="outputs differ"):
        pp.extract(model, x)


def test_attach_and_extract_errors():
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        pp.attach_gates(pp.resnet20(), [1, 2])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        pp.attach_gates("resnet20", x)
    with pytest.raises(ValueError, match="ignored_layers names 'nope'"):
        pp.attach_gates(pp.resnet20(), x, ignored_layers=["nope"])
    with pytest.raises(ValueError, match="min_channels must be an int >= 1"):
        pp.attach_gates(pp.resnet20(), x, min_channels=0)
    with pytest.raises(ValueError, match="round_to must be None or an int >= 1"):
        pp.attach_gates(pp.resnet20(), x, round_to=2.5)
    with pytest.raises(ValueError, match="ste must be one of"):
        pp.attach_gates(pp.resnet20(), x, ste="nope")
    model = pp.attach_gates(pp.resnet20(), x)
    with pytest.raises(ValueError, match="already has gates"):
        pp.attach_gates(model, x)
    with pytest.raises(ValueError, match="no gates from attach_gates"):
        pp.extract(pp.resnet20())
    with pytest.raises(ValueError, match="no channel spec"):
        pp.save_pruned(pp.resnet20(), "/tmp/never-written")
    with pytest.raises(ValueError, match="example_inputs have 5 channels but the model's first convolution 'conv1' "
                                         r"takes 3: shape \(N, 3, H, W\), got \(1, 5, 32, 32\)"):
        pp.attach_gates(pp.resnet20(), torch.randn(1, 5, 32, 32))


def test_nonfinite_scores_are_reported_at_extraction():
    model = pp.resnet20()
    x = torch.randn(1, 3, 32, 32)
    pp.attach_gates(model, x)
    with torch.no_grad():
        model.polarprune_bank.scores[20] = float("nan")
    with pytest.raises(pp.NonFiniteGateError, match="layer1.0.conv1 \\(1 of 16\\)"):
        pp.extract(model, x)


def test_cifar_resnet_argument_errors():
    with pytest.raises(ValueError, match="depth must be 6n \\+ 2"):
        pp.models.CifarResNet(21)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        pp.models.CifarResNet(20, num_classes=0)
