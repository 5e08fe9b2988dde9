"""Saved models and the API are safe against tampered files and careless arguments.

Spec and weights files carry digests and a schema; every refusal is a ValueError/TypeError naming the file,
field or argument. The property test at the end mutates a valid saved model in many ways and asserts that
load_pruned either refuses it with ValueError/TypeError or returns exactly the saved model.
"""
import copy
import json
import math
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import polarprune_cuda as pp
from polarprune_cuda import _io
from polarprune_cuda.sparse import fggp
from polarprune_cuda.surgery.inputs import MAX_INPUT_ELEMENTS
from polarprune_cuda.surgery.spec import _spec_input_shapes, spec_digest


def make():
    return pp.resnet20(num_classes=4, in_channels=1)


X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(7))


def _gated(blocks=True):
    torch.manual_seed(0)
    model = make().eval()
    pp.attach_gates(model, X, min_channels=1, blocks=blocks)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A pruned resnet20 (closed channels and closed blocks) saved once: (folder, state_dict, output on X)."""
    model = _gated()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
        model.polarprune_bank.scores[::3] = -1.0
    small = pp.extract(model, X).eval()
    assert small.polarprune_spec["removed_blocks"]      # the spec has closed blocks and removed_with groups
    folder = pp.save_pruned(small, tmp_path_factory.mktemp("saved") / "m")
    with torch.no_grad():
        out = small(X)
    return folder, copy.deepcopy(small.state_dict()), out


def _copy(saved, tmp_path):
    return shutil.copytree(saved[0], tmp_path / "m")


def _read(folder):
    return json.loads((folder / "spec.json").read_text())


def _write(folder, spec, redigest=True):
    spec = dict(spec)
    if redigest:
        spec["sha256"] = spec_digest(spec)
    (folder / "spec.json").write_text(json.dumps(spec))


def _flip(file, positions, mask=0xFF):
    data = bytearray(file.read_bytes())
    for p in positions:
        data[p % len(data)] ^= mask
    file.write_bytes(bytes(data))


def _assert_same(model, saved):
    _, state, out = saved
    got = model.state_dict()
    assert list(got) == list(state)
    assert all(torch.equal(got[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model.eval()(X), out)


# ----------------------------------------------------------------------------- 1. integrity of saved files

def test_save_writes_digests_and_round_trips(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    spec = _read(folder)
    assert spec["sha256"] == spec_digest(spec)
    assert (folder / "weights.pt.sha256").read_text().split() == [
        _io.sha256_bytes((folder / "weights.pt").read_bytes()), "weights.pt"]
    model = pp.load_pruned(folder, make)
    _assert_same(model, saved)
    assert "sha256" not in model.polarprune_spec
    pp.save_pruned(model, tmp_path / "again")       # a loaded model saves the same spec again
    assert _read(tmp_path / "again") == spec


def test_flipped_weights_are_refused_naming_the_file(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    size = (folder / "weights.pt").stat().st_size
    _flip(folder / "weights.pt", range(size // 2, size // 2 + 64))
    with pytest.raises(_io.IntegrityError, match=r"weights\.pt does not match its digest"):
        pp.load_pruned(folder, make)
    (folder / "weights.pt.sha256").unlink()
    with pytest.raises(_io.IntegrityError, match=r"weights\.pt has no digest file"):
        pp.load_pruned(folder, make)


def test_edited_spec_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    spec = _read(folder)
    edited = copy.deepcopy(spec)
    edited["groups"][0]["kept"] = edited["groups"][0]["kept"][:-1]
    _write(folder, edited, redigest=False)          # edited, digest kept: refused by the digest
    with pytest.raises(_io.IntegrityError, match="spec.json was changed or damaged after it was written"):
        pp.load_pruned(folder, make)
    _write(folder, edited)                           # digest recomputed: the model check refuses it
    with pytest.raises(ValueError, match="spec does not match the model: 'conv1' has conv1.weight of shape"):
        pp.load_pruned(folder, make)
    del spec["sha256"]
    _write(folder, spec, redigest=False)             # no digest: refused unless verify=False
    with pytest.raises(_io.IntegrityError, match="has no 'sha256' field"):
        pp.load_pruned(folder, make)
    _assert_same(pp.load_pruned(folder, make, verify=False), saved)
    with pytest.raises(TypeError, match="verify must be True or False"):
        pp.load_pruned(folder, make, verify="no")


def test_sparse_file_has_a_digest_and_a_checked_structure(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(16, 16)
    w[w.abs() < 1.0] = 0
    state = {"w": w, "b": torch.randn(16)}
    fggp.save_sparse(state, tmp_path / "s.pt")
    assert (tmp_path / "s.pt.sha256").is_file()
    back = fggp.load_sparse(tmp_path / "s.pt")
    assert all(torch.equal(back[k], state[k]) for k in state)
    _flip(tmp_path / "s.pt", range(100, 164))
    with pytest.raises(_io.IntegrityError, match=r"s\.pt does not match its digest"):
        fggp.load_sparse(tmp_path / "s.pt")
    # a packed entry whose shape claims more than its bitmask covers: refused before allocating
    _io.save_tensors({"w": {"shape": [10 ** 6, 10 ** 6], "bitmask": torch.zeros(2, dtype=torch.uint8),
                            "values": torch.zeros(0)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt: sparse state_dict: entry 'w' needs a 1-D uint8 bitmask"):
        fggp.load_sparse(tmp_path / "bad.pt")


# ----------------------------------------------------------------------------- 2. spec schema

def test_input_dtypes_outside_the_allow_list_are_refused(saved, tmp_path, monkeypatch):
    folder = _copy(saved, tmp_path)
    spec = _read(folder)
    spec["input_dtypes"] = ["os.system"]
    _write(folder, spec)
    looked_up = []
    monkeypatch.setattr(pp.surgery.spec, "random_inputs", lambda *a: looked_up.append(a))
    with pytest.raises(ValueError, match=r"field 'input_dtypes\[0\]' must be one of float32, .*got \"os.system\""):
        pp.load_pruned(folder, make)
    assert not looked_up


def test_huge_input_shapes_are_refused_before_any_allocation(saved, tmp_path, monkeypatch):
    folder = _copy(saved, tmp_path)
    spec = _read(folder)
    spec["input_shapes"] = [[1, 1, 100000, 100000]]
    _write(folder, spec)
    monkeypatch.setattr(pp.surgery.spec, "random_inputs", lambda *a: pytest.fail("allocated inputs"))
    with pytest.raises(ValueError,
                       match=rf"field 'input_shapes\[0\]' must be a shape of at most {MAX_INPUT_ELEMENTS} elements"):
        pp.load_pruned(folder, make)


def test_spec_input_shapes_are_kept_loadable():
    assert _spec_input_shapes([[2, 3, 32, 32]]) == [[2, 3, 32, 32]]
    big = _spec_input_shapes([[4096, 3, 64, 64]])
    assert big[0][1:] == [3, 64, 64] and 1 <= big[0][0] < 4096 and math.prod(big[0]) <= MAX_INPUT_ELEMENTS
    with pytest.raises(ValueError, match="example_inputs: one sample of shape"):
        _spec_input_shapes([[1, 3, 4096, 4096]])


def test_spec_that_is_a_json_list_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "spec.json").write_text(json.dumps([_read(folder)]))
    with pytest.raises(ValueError, match="must hold a JSON object .*got a JSON array"):
        pp.load_pruned(folder, make)


@pytest.mark.parametrize("path, field", [
    (("shapes",), "shapes"),
    (("input_dtypes",), "input_dtypes"),
    (("groups", 0, "kept"), r"groups\[0\]\.kept"),
    (("blocks", 1, "closed"), r"blocks\[1\]\.closed"),
])
def test_missing_key_is_named(saved, tmp_path, path, field):
    folder = _copy(saved, tmp_path)
    spec = _read(folder)
    node = spec
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    _write(folder, spec)
    with pytest.raises(ValueError, match=f"field '{field}' is missing"):
        pp.load_pruned(folder, make)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s["groups"][0].update(channels=True), r"'groups\[0\]\.channels' must be an int >= 1, got true"),
    (lambda s: s["groups"][0].update(kept=[3, 1]), r"'groups\[0\]\.kept' must be sorted channel indices"),
    (lambda s: s["groups"][0].update(kept=[0, 99]), r"'groups\[0\]\.kept\[1\]' must be an int in \[0, 15\]"),
    (lambda s: s["blocks"][0].update(act=3), r"'blocks\[0\]\.act' must be null or an attribute name"),
    (lambda s: s.update(removed_blocks=[]), r"'removed_blocks' must be the names of the closed blocks"),
    (lambda s: s["shapes"].update({"conv1.weight": [-1]}), r"'shapes\.conv1\.weight\[0\]' must be an int >= 0"),
    (lambda s: s.update(format=2), "not a polarprune_cuda channel spec of format 1"),
    (lambda s: s.update(extra=1), "unknown field 'extra'"),
    # a group that declares 2**32 repeats is refused by its length, before the expected list is built
    (lambda s: s["groups"][0].update(channels=2 ** 32, repeat=2 ** 32, kept=[0]),
     r"'groups\[0\]\.kept' must be the same channels in each of its 4294967296 groups of 1"),
])
def test_wrong_field_types_are_named(saved, tmp_path, edit, match):
    folder = _copy(saved, tmp_path)
    spec = _read(folder)
    edit(spec)
    _write(folder, spec)
    with pytest.raises(ValueError, match=match):
        pp.load_pruned(folder, make)


class Spare(pp.models.CifarResNet):
    """resnet20 with a conv its forward never uses: Torch-Pruning cannot remove its channels."""

    def __init__(self):
        super().__init__(20, 4, 1)
        self.spare = nn.Conv2d(4, 6, 1)


def test_failure_inside_channel_removal_is_a_spec_mismatch(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    spec = _read(folder)
    spec["groups"].append({"name": "spare", "root": "spare", "channels": 6, "repeat": 1, "kept": [0, 1, 2]})
    spec["shapes"].update({"spare.weight": [3, 4, 1, 1], "spare.bias": [3]})
    _write(folder, spec)
    state = _io.load_tensors(folder / "weights.pt")
    state.update({"spare.weight": torch.zeros(3, 4, 1, 1), "spare.bias": torch.zeros(3)})
    _io.save_tensors(state, folder / "weights.pt")
    with pytest.raises(ValueError, match="spec does not match the model: removing the spec's channels failed"):
        pp.load_pruned(folder, Spare)


def test_closed_block_with_another_activation_is_a_spec_mismatch(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    spec = _read(folder)
    block = next(b for b in spec["blocks"] if b["closed"])
    block["act"] = None
    _write(folder, spec)
    with pytest.raises(ValueError, match=f"block '{block['name']}' has shortcut 'shortcut' and activation 'relu', "
                                         "the spec says 'shortcut' and None"):
        pp.load_pruned(folder, make)


# ----------------------------------------------------------------------------- 3. factory

def test_a_spec_that_prunes_the_classifier_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    spec = _read(folder)
    spec["groups"].append({"name": "fc", "root": "fc", "channels": 4, "repeat": 1, "kept": [0, 1]})
    spec["shapes"]["fc.weight"][0] = spec["shapes"]["fc.bias"][0] = 2
    _write(folder, spec)
    state = _io.load_tensors(folder / "weights.pt")
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][:2].clone(), state["fc.bias"][:2].clone()
    _io.save_tensors(state, folder / "weights.pt")
    with pytest.raises(ValueError, match=r"it changes the model's outputs from \[\(2, 4\)\] to \[\(2, 2\)\]"):
        pp.load_pruned(folder, make)


@pytest.mark.parametrize("key,value,named", [
    ("conv1.weight", lambda t: t.to(torch.complex64), "'conv1.weight' is complex64; a model's weights are real"),
    ("conv1.weight", lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), "'conv1.weight' holds NaN or inf"),
    ("bn1.running_var", lambda t: -t, "'bn1.running_var' holds negative values"),
])
def test_weights_no_model_can_hold_are_refused(saved, tmp_path, key, value, named):
    folder = _copy(saved, tmp_path)
    state = _io.load_tensors(folder / "weights.pt")
    state[key] = value(state[key])
    _io.save_tensors(state, folder / "weights.pt")
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        pp.load_pruned(folder, make)


def test_factory_must_be_a_callable_returning_a_module(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    with pytest.raises(TypeError, match=r"factory must be a callable .*lambda: MyNet\(\), not a model instance"):
        pp.load_pruned(folder, make())
    with pytest.raises(TypeError, match="factory must return an nn.Module .*got dict"):
        pp.load_pruned(folder, lambda: {"conv1": 1})
    with pytest.raises(TypeError, match="factory must be a callable"):
        pp.load_pruned(folder, "resnet20")


# ----------------------------------------------------------------------------- 4. API arguments

def test_min_channels_and_round_to_are_checked_everywhere():
    model = _gated(blocks=False)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match=f"min_channels must be None .* or an int >= 1, got {bad!r}"):
            pp.extract(model, X, min_channels=bad)
    with pytest.raises(ValueError, match=r"round_to must be None \(the value given to attach_gates\) or an int "
                                         ">= 1, got -4"):
        pp.extract(model, X, round_to=-4)
    with pytest.raises(ValueError, match="min_channels must be None .* or an int >= 1, got -3"):
        pp.predicted_count(model, min_channels=-3)
    with pytest.raises(ValueError, match="round_to must be None .* got 0"):
        pp.kept_channels(model, round_to=0)
    with pytest.raises(ValueError, match="min_channels must be an int >= 1, got -1"):
        pp.attach_gates(make(), X, min_channels=-1)
    assert pp.predicted_count(model, min_channels=2, round_to=4)["params"] > 0


def test_ignored_layers_must_be_a_list():
    with pytest.raises(TypeError, match="ignored_layers must be a list of modules or module names, got str"):
        pp.attach_gates(make(), X, ignored_layers="conv1")
    model = make()
    with pytest.raises(TypeError, match="ignored_layers must be a list of modules or module names, got Conv2d"):
        pp.attach_gates(model, X, ignored_layers=model.conv1)
    for form in (["layer3.0.conv1"], ("layer3.0.conv1",)):
        gated = pp.attach_gates(make(), X, ignored_layers=form)
        assert type(gated.layer3[0].bn1) is nn.BatchNorm2d
    model = make()
    pp.attach_gates(model, X, ignored_layers=[model.layer3[0].conv1])
    assert type(model.layer3[0].bn1) is nn.BatchNorm2d


def test_example_inputs_that_do_not_fit_are_named():
    wrong = torch.randn(1, 3, 8, 8)    # 3 channels for a 1-channel model
    named = r"example_inputs have 3 channels but the model's first convolution 'conv1' takes 1: shape \(N, 1, H, W\)"
    with pytest.raises(ValueError, match=named):
        pp.attach_gates(make(), wrong)
    with pytest.raises(ValueError, match=named):
        pp.count(make(), wrong)
    with pytest.raises(ValueError, match=named):
        pp.extract(_gated(blocks=False), wrong)


def test_empty_batch_is_refused():
    empty = torch.randn(0, 1, 8, 8)
    match = r"example_inputs must be one batch of at least one sample.*shape \(0, 1, 8, 8\)"
    with pytest.raises(ValueError, match=match):
        pp.attach_gates(make(), empty)
    with pytest.raises(ValueError, match=match):
        pp.count(make(), empty)
    with pytest.raises(ValueError, match=match):
        pp.extract(_gated(blocks=False), empty)


@pytest.mark.parametrize("where, kind, value", [
    ("layer1.0.conv1.weight", "parameter", float("nan")),
    ("layer2.1.bn2.running_var", "buffer", float("inf")),
    ("bn1.running_mean", "buffer", float("nan")),
])
def test_nonfinite_weights_are_named_at_extraction(where, kind, value):
    model = _gated(blocks=False)
    with torch.no_grad():
        dict(model.named_parameters(), **dict(model.named_buffers()))[where].view(-1)[0] = value
    with pytest.raises(ValueError, match=f"model {kind} '{where}' holds NaN or inf"):
        pp.extract(model, X)


# ----------------------------------------------------------------------------- property: any tampering

def _paths(node, prefix=()):
    """Every (container path, key) of a JSON tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield prefix, key
        yield from _paths(value, prefix + (key,))


def _at(spec, prefix):
    for key in prefix:
        spec = spec[key]
    return spec


OTHER_VALUES = [None, True, False, "x", "float32", "layer1.0", 1.5, -1, 0, 1, 7, 2 ** 31, 2 ** 70, [], [1], {},
                {"a": 1}, [[1, 1, 8, 8]]]


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), mode=st.sampled_from(["drop", "retype", "number", "spec_bytes", "weights_bytes"]))
def test_tampered_files_are_refused_or_load_exactly(saved, tmp_path, data, mode):
    folder = tmp_path / "case"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(saved[0], folder)
    spec = _read(folder)
    del spec["sha256"]
    paths = list(_paths(spec))
    if mode in ("drop", "retype", "number"):
        prefix, key = data.draw(st.sampled_from(paths), label="where")
        parent = _at(spec, prefix)
        if mode == "drop":
            del parent[key]
        elif mode == "retype":
            parent[key] = data.draw(st.sampled_from(OTHER_VALUES), label="value")
        else:
            value = parent[key]
            base = value if type(value) is int else 1
            parent[key] = data.draw(st.sampled_from([-1, 0, base - 1, base + 1, 2 * base, 10 ** 9, -(2 ** 63)]),
                                    label="number")
        _write(folder, spec)   # re-digested: the schema and the model checks must catch it
    else:
        file = folder / ("spec.json" if mode == "spec_bytes" else "weights.pt")
        size = file.stat().st_size
        positions = data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=8), label="positions")
        _flip(file, positions, data.draw(st.integers(1, 255), label="mask"))
    try:
        model = pp.load_pruned(folder, make)
    except (ValueError, TypeError):
        return
    _assert_same(model, saved)


def test_a_deeply_nested_spec_is_refused_without_recursion(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "spec.json").write_text('{"groups": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="not valid JSON: RecursionError"):
        pp.load_pruned(folder, make)
    spec, nested = _read(saved[0]), [0.5]
    for _ in range(20):
        nested = [nested]
    spec["preprocessing"] = {"mean": nested}     # parses, and is deeper than any spec
    _write(folder, spec)
    with pytest.raises(ValueError, match="nested more than 16 levels deep"):
        pp.load_pruned(folder, make)
