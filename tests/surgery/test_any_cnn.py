"""Any CNN a user brings (issue: concatenations, BatchNorm2d subclasses, every unsupported group named at once,
reshapes that move channels, module versions kept by save/load, example inputs diagnosed, a grouping that
does not converge stopped). Small hand-made models; what is asserted is exact by construction (one forward
pass, counts, classes, messages)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import polarprune_cuda as pp
from polarprune_cuda.errors import UnsupportedModelError
from polarprune_cuda.gates.modules import GatedNormMixin
from polarprune_cuda.surgery import tp as tp_adapter

X = torch.randn(2, 3, 12, 12)


class NormAct(nn.BatchNorm2d):
    """A BatchNorm2d subclass with its own forward (as timm's BatchNormAct2d): the norm, then an activation."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return self.act(x)


class Dense(nn.Module):
    """Two dense layers: every BatchNorm after the stem sees a concatenation of several groups."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm0 = NormAct(8)
        self.norm1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(14)
        self.conv2 = nn.Conv2d(14, 5, 3, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(19)
        self.head = nn.Linear(19, 4)

    def forward(self, x):
        x = self.norm0(self.stem(x))
        x = torch.cat([x, self.conv1(F.relu(self.norm1(x)))], 1)
        x = torch.cat([x, self.conv2(F.relu(self.norm2(x)))], 1)
        return self.head(F.adaptive_avg_pool2d(F.relu(self.norm3(x)), 1).flatten(1))


class CrossStage(nn.Module):
    """A CSP stage: the expanded tensor is split in two, the second part runs through a residual block."""

    def __init__(self):
        super().__init__()
        self.conv_exp = nn.Conv2d(3, 16, 1, bias=False)
        self.bn_exp = nn.BatchNorm2d(16)
        self.conv_a = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(8)
        self.conv_out = nn.Conv2d(16, 10, 1, bias=False)
        self.bn_out = nn.BatchNorm2d(10)
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        x = F.relu(self.bn_exp(self.conv_exp(x)))
        xs, xb = x.split(8, dim=1)
        xb = xb + self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(xb)))))
        x = F.relu(self.bn_out(self.conv_out(torch.cat([xs, xb], 1))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Heads(nn.Module):
    """A conv group whose channels a view splits into heads (as attention does), beside a plain conv group."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.qk = nn.Conv2d(8, 8, 1)
        self.bnq = nn.BatchNorm2d(8)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        q = self.bnq(self.qk(x))
        n = q.shape[0]
        heads = q.view(n, 2, 4, -1)                              # channels into 2 heads of 4
        attn = (heads.transpose(-1, -2) @ heads).mean(-1)       # (n, 2, HW)
        mixed = attn.mean(-1)                                    # (n, 2)
        return self.head(torch.cat([x.mean((2, 3)), q.mean((2, 3)) * mixed.repeat(1, 4)], 1)[:, :16])


def _random_stats(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    return model.eval()


def _close_half(model: nn.Module) -> None:
    bank = pp.find_bank(model)
    with torch.no_grad():
        scores = torch.ones_like(bank.scores)
        for offset, size in zip(bank.offsets, bank.sizes):
            scores[offset: offset + max(1, size // 2)] = -1.0
        bank.scores.copy_(scores)


def _exact(model: nn.Module, x=X, min_channels: int = 1) -> nn.Module:
    _close_half(model)
    with torch.no_grad():
        ref = model(x)
    small = pp.extract(model, x, min_channels=min_channels)
    with torch.no_grad():
        assert torch.allclose(small(x), ref, atol=1e-5, rtol=1e-5)
    assert pp.count(small, x) == pp.predicted_count(model, min_channels=min_channels)
    return small


def test_batchnorm_subclass_is_gated_with_its_own_forward_and_extracted_to_its_class():
    model = _random_stats(Dense())
    with torch.no_grad():
        before = model(X)
    pp.attach_gates(model, X, min_channels=1)
    assert isinstance(model.norm0, NormAct) and isinstance(model.norm0, GatedNormMixin)
    assert type(model.norm0).__name__ == "GatedNormAct"
    with torch.no_grad():
        assert torch.equal(model(X), before)                   # every gate open: the class's forward, unchanged
    small = _exact(model)
    assert type(small.norm0) is NormAct and small.norm0.num_features < 8
    assert "weight" not in small.norm0.__dict__ and isinstance(small.norm0.act, nn.ReLU)


def test_concatenated_groups_each_gate_their_own_channels():
    model = _random_stats(Dense())
    pp.attach_gates(model, X, min_channels=1)
    bank = pp.find_bank(model)
    assert bank.sizes == [8, 6, 5]                              # stem, conv1, conv2: one segment each
    index = model.norm3.gate_index                               # 19 channels = 8 + 6 + 5, in cat order
    assert index is not None and index.tolist() == list(range(19))
    assert model.norm2.gate_index.tolist() == list(range(14))
    assert "_pp_gate_index" not in model.state_dict() and "norm3._pp_gate_index" not in model.state_dict()
    small = _exact(model)
    assert small.norm3.num_features == 4 + 3 + 3                # half of each group kept (rounded up)
    assert small.conv2.in_channels == 7 and small.head.in_features == 10


def test_split_and_concat_follow_the_arguments_not_the_order_torch_pruning_found_them():
    model = _random_stats(CrossStage())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pp.attach_gates(model, X, min_channels=1, on_unsupported="skip")
    skipped = [str(w.message) for w in caught if "leaves" in str(w.message)]
    # conv_exp's channels, xb's residual (conv_b) among them, form one group that passes the first part of a
    # split with a fixed size (xs): it cannot shrink, and is named and skipped; conv_a's group is gated
    assert len(skipped) == 1 and "  - conv_b: " in skipped[0] and "fixed in the model's code" in skipped[0]
    assert pp.find_bank(model).sizes == [4, 10]                  # conv_a's and conv_out's groups
    small = _exact(model)
    assert small.conv_exp.out_channels == 16 and small.conv_a.out_channels == 2 and small.conv_b.in_channels == 2
    assert small.conv_out.out_channels == 5 and small.head.in_features == 5


def test_every_unsupported_group_is_named_at_once_and_skip_gates_the_rest():
    model = _random_stats(Heads())
    with pytest.raises(UnsupportedModelError) as err:
        pp.attach_gates(model, X, min_channels=1)
    text = str(err.value)
    assert "1 channel group(s) of the model cannot be gated" in text and "'qk'" in text
    assert "splits or moves its channels" in text and "on_unsupported='skip'" in text
    assert pp.find_bank(model) is None                           # refused before any change
    with pytest.warns(UserWarning, match=r"attach_gates leaves 1 channel group\(s\) ungated:\n  - qk: "):
        pp.attach_gates(model, X, min_channels=1, on_unsupported="skip")
    assert type(model.bnq) is nn.BatchNorm2d and pp.find_bank(model).sizes == [8]
    _exact(model)
    with pytest.raises(ValueError, match="on_unsupported must be one of 'raise', 'skip', got 'ignore'"):
        pp.attach_gates(Heads(), X, on_unsupported="ignore")


def test_a_grouping_that_does_not_converge_is_stopped_naming_the_layer(monkeypatch):
    monkeypatch.setattr(tp_adapter, "GROUPING_SECONDS", -1.0)   # the deadline has passed at the first revisit
    monkeypatch.setattr(tp_adapter, "_DEADLINE", [])
    model = Dense()
    with pytest.raises(UnsupportedModelError, match=r"grouping of the model's channels did not converge .*"
                                                    r"while following '\w+'"):
        pp.attach_gates(model, X)
    assert pp.find_bank(model) is None and tp_adapter._DEADLINE == []


def test_torch_pruning_is_restored_after_every_call():
    import torch_pruning as tp

    mapping, group = tp.dependency.index_mapping, tp.dependency.group.Group
    before = (mapping.update_split_index_mapping, mapping.update_concat_index_mapping, group.has_pruning_op)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _exact(pp.attach_gates(_random_stats(CrossStage()), X, on_unsupported="skip", min_channels=1))
    assert (mapping.update_split_index_mapping, mapping.update_concat_index_mapping, group.has_pruning_op) == before


class Versioned(nn.Module):
    """A module that reads its version when loading (as torchvision's MNASNet does)."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 2)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def _round_trip(cls, folder) -> nn.Module:
    """Gate ``cls()``, close half of each group, extract, save, load: the loaded model's outputs are bit-equal."""
    model = _random_stats(cls())
    pp.attach_gates(model, X, min_channels=1)
    small = _exact(model)
    pp.save_pruned(small, folder)
    loaded = pp.load_pruned(folder, cls)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(X), small(X))
    return loaded


def test_save_pruned_keeps_module_versions_for_load_pruned(tmp_path):
    _round_trip(Versioned, tmp_path)


def test_malformed_module_versions_are_refused(tmp_path):
    from polarprune_cuda import _io

    model = _random_stats(Versioned())
    pp.attach_gates(model, X, min_channels=1)
    pp.save_pruned(_exact(model), tmp_path)
    state = _io.load_tensors(tmp_path / "weights.pt")
    state._metadata[""] = {"version": "2; rm -rf"}
    _io.save_tensors(state, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match=r"_metadata entry '' must be a dict of str -> int"):
        pp.load_pruned(tmp_path, Versioned)


@pytest.mark.parametrize("inputs, message", [
    (torch.randn(2, 3, 12, 12, dtype=torch.float64), "example_inputs have dtype float64 but the model's parameters "
                                                     r"float32; pass example_inputs.to\(torch.float32\)"),
    (torch.randn(2, 12, 12), r"example_inputs must have shape \(N, 3, H, W\), got \(2, 12, 12\) \(3 dimensions\)"),
    (torch.randn(2, 4, 12, 12), "example_inputs have 4 channels but the model's first convolution 'stem' takes 3"),
    (torch.randn(0, 3, 12, 12), "example_inputs must be one batch of at least one sample"),
])
def test_wrong_example_inputs_are_named_before_tracing(inputs, message):
    model = Dense()
    with pytest.raises(ValueError, match=message):
        pp.attach_gates(model, inputs)
    assert pp.find_bank(model) is None


def test_example_inputs_on_another_device_are_named():
    model = Dense().to("meta")
    with pytest.raises(ValueError, match=r"example_inputs are on cpu but the model's parameters are on meta; "
                                         r"pass example_inputs.to\('meta'\)"):
        pp.attach_gates(model, X)


class Dashed(nn.Module):
    """Child names with '-' (torchvision's RegNet: 'block1-0'): legal in nn.Module, kept by the spec."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential()
        self.body.add_module("block1-0", nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_module_names_with_dashes_save_and_load(tmp_path):
    assert _round_trip(Dashed, tmp_path).body[0][0].out_channels == 4
