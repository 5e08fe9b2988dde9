"""Resuming from a damaged or edited checkpoint is refused with one line naming the file and the field.

Three real checkpoints are written once per module (a prune that switched to the extracted network, one that
kept the gated network, and an FGGP run, so the pruner's state is covered), each by a tiny run interrupted after
its first epoch. The :class:`Expected` the checks compare with is the one a real ``--resume`` builds: it is
recorded from ``Checkpointer.load`` during one.
"""
import copy
import dataclasses
import random
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polarprune_cuda import cli
from polarprune_cuda._io import content_digest
from polarprune_cuda.train.checkpoint import DIGEST_KEY, FIELDS, Checkpointer, CheckpointError

BASE = ["prune", "--dataset", "digits", "--model", "resnet20", "--max-train", "64", "--max-test", "32",
        "--batch-size", "32", "--latency-batch", "4", "--quiet", "--min-channels", "2", "--epochs", "2"]
# polar: the gates freeze in epoch 1, so its checkpoint is one written after the switch to the extracted network
# (its "model" is the extracted network's, with "gated_model" and "spec" beside it); polar-gated trains the gated
# network to the end (--keep-gated); polar-shrink adds --shrink-every (its checkpoint holds "shrink")
METHODS = {"polar": [], "polar-gated": ["--keep-gated"], "polar-shrink": ["--shrink-every", "1"],
           "fggp": ["--method", "fggp"]}


@dataclasses.dataclass
class Run:
    args: list          # the command, without --out
    folder: Path        # the interrupted run's folder (checkpoint.pt and the run's own files)
    state: dict         # the checkpoint as written, without its digest
    load: tuple         # what --resume passes to Checkpointer.load: (config, defaults, resume_free, expected)

    @property
    def expected(self):
        return self.load[3]


class _Recorded(BaseException):
    """Stops the recording --resume once Checkpointer.load was called (not an Exception: the CLI lets it by)."""


def _read(path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    del state[DIGEST_KEY]
    return state


def _resume_arguments(args, folder: Path, scratch: Path) -> tuple:
    """The arguments a real ``--resume`` of ``args`` calls Checkpointer.load with (on a copy of the folder)."""
    copy_ = scratch / "resume"
    shutil.copytree(folder, copy_)
    recorded = []

    def record(self, *load_args):
        recorded.append(load_args)
        raise _Recorded

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpointer, "load", record)
        with pytest.raises(_Recorded):
            cli.main([*args, "--out", str(copy_), "--resume"])
    (load_args,) = recorded
    assert len(load_args) == 4 and load_args[3] is not None
    return load_args


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, extra in METHODS.items():
        args = [*BASE, *extra]
        scratch = tmp_path_factory.mktemp(name)
        folder = scratch / "run"
        assert cli.main([*args, "--interrupt-after-epoch", "1", "--out", str(folder)]) == 130
        out[name] = Run(args, folder, _read(folder / "checkpoint.pt"), _resume_arguments(args, folder, scratch))
    return out


def _copy(run: Run, tmp_path) -> Path:
    folder = tmp_path / "run"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(run.folder, folder)
    return folder


def _edited(run: Run, tmp_path, edit) -> Path:
    """A copy of the run whose checkpoint is edited by ``edit(state)`` and written well-formed (re-digested)."""
    folder = _copy(run, tmp_path)
    state = copy.deepcopy(run.state)
    edit(state)
    Checkpointer(folder / "checkpoint.pt").save(state)
    return folder


def _resume(run: Run, folder: Path, capsys):
    rc = cli.main([*run.args, "--out", str(folder), "--resume"])
    return rc, capsys.readouterr().err


def _assert_refused(rc, err, *fragments):
    assert rc == 2, err
    assert "Traceback" not in err and "(unexpected;" not in err, err   # a CheckpointError, not a crash
    assert "checkpoint.pt" in err and "delete it or use another --out" in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def _load(run: Run, path):
    return Checkpointer(path).load(*run.load)


# ----------------------------------------------------------------------------- the valid checkpoints

@pytest.mark.parametrize("method", METHODS)
def test_valid_checkpoint_loads_unchanged(runs, method):
    run = runs[method]
    state = _load(run, run.folder / "checkpoint.pt")
    assert content_digest(state) == content_digest(run.state)
    polar = method.startswith("polar")
    assert (run.expected.pruner is None) == polar and run.expected.gated == polar
    assert ({"spec", "gated_model"} <= set(state)) == (method in ("polar", "polar-shrink"))   # after the switch
    assert ("shrink" in state) == (method == "polar-shrink")


# ----------------------------------------------------------------------------- (1) every field removed

@pytest.mark.parametrize("field", [*FIELDS, DIGEST_KEY])
def test_removed_field_is_named(runs, tmp_path, capsys, field):
    for run in runs.values():
        folder = _copy(run, tmp_path)
        if field == DIGEST_KEY:   # written without a digest at all
            torch.save(run.state, folder / "checkpoint.pt")
            fragment = "has no digest"
        else:
            folder = _edited(run, tmp_path, lambda s: s.pop(field))
            fragment = f"field '{field}' is missing" if field != "format" else "its field 'format' is missing"
        rc, err = _resume(run, folder, capsys)
        _assert_refused(rc, err, fragment)


# ----------------------------------------------------------------------------- (2) the epoch

@pytest.mark.parametrize("value", [-3, 99, True, "1", 1.0])
def test_epoch_out_of_range_or_of_another_type_is_refused(runs, tmp_path, capsys, value):
    run = runs["polar"]
    folder = _edited(run, tmp_path, lambda s: s.update(epoch=value))
    rc, err = _resume(run, folder, capsys)
    _assert_refused(rc, err, "field 'epoch' must be an int in [0, 2], got")


# ----------------------------------------------------------------------------- (3) the model's state_dict

def _narrow(state, key):
    state["model"][key] = state["model"][key][:-1].clone()


def _nan(state, key):
    state["model"][key] = state["model"][key].clone()
    state["model"][key].view(-1)[0] = float("nan")


MODEL_EDITS = {
    "wrong shape": (lambda s: _narrow(s, "layer1.0.conv1.weight"),
                    "field 'model' entry 'layer1.0.conv1.weight' must be a tensor of shape ("),
    "missing key": (lambda s: s["model"].pop("fc.bias"), "field 'model' entry 'fc.bias' is missing"),
    "extra key": (lambda s: s["model"].update({"fc.extra": torch.zeros(3)}),
                  "field 'model' entry 'fc.extra' is not an entry of this run's model"),
    "NaN in running_var": (lambda s: _nan(s, "layer1.0.bn1.running_var"),
                           "field 'model' entry 'layer1.0.bn1.running_var' holds NaN or inf"),
    "wrong dtype": (lambda s: s["model"].update({"fc.weight": s["model"]["fc.weight"].double()}),
                    "field 'model' entry 'fc.weight' must be a tensor of shape (10, "),
}


@pytest.mark.parametrize("edit", MODEL_EDITS)
def test_bad_model_entry_is_named(runs, tmp_path, capsys, edit):
    change, fragment = MODEL_EDITS[edit]
    for run in runs.values():
        rc, err = _resume(run, _edited(run, tmp_path, change), capsys)
        _assert_refused(rc, err, fragment)


def _set(path, value):
    def edit(state):
        *head, last = path
        target = state
        for key in head:
            target = target[key]
        target[last] = value
    return edit


# edits of the other fields, checked at the Checkpointer.load level (what --resume calls): (method, edit, message)
SCHEMA_EDITS = {
    "momentum of the wrong shape": ("polar", _set(("optimizer", "state", 0, "momentum_buffer"), torch.zeros(3)),
                                    "field 'optimizer' entry 'state'[0]['momentum_buffer'] must be a tensor of shape"),
    "momentum of no parameter": ("polar", _set(("optimizer", "state", 999), {"momentum_buffer": torch.zeros(1)}),
                                 "field 'optimizer' entry 'state'[999] is not a parameter of this run's optimizer"),
    "one parameter group": ("polar", lambda s: s["optimizer"]["param_groups"].pop(),
                            "field 'optimizer' entry 'param_groups' must have 2 entries, got 1"),
    "params of another model": ("polar", _set(("optimizer", "param_groups", 0, "params"), [0, 1]),
                                "field 'optimizer' entry 'param_groups'[0]['params'] must be"),
    "infinite lr": ("fggp", _set(("optimizer", "param_groups", 0, "lr"), float("inf")),
                    "field 'optimizer' entry 'param_groups'[0]['lr'] must be a finite number >= 0, got inf"),
    "other momentum": ("fggp", _set(("optimizer", "param_groups", 0, "momentum"), 0.5),
                       "field 'optimizer' entry 'param_groups'[0]['momentum'] must be 0.9 as in this run, got 0.5"),
    "scheduler past the run": ("polar", _set(("scheduler", "last_epoch"), 5),
                               "field 'scheduler' entry 'last_epoch' must be an int in [0, 4], got 5"),
    "scheduler lambda state": ("polar", _set(("scheduler", "lr_lambdas"), [{"x": 1}, None]),
                               "field 'scheduler' entry 'lr_lambdas' must be [None, None] as in this run"),
    "scheduler extra entry": ("polar", _set(("scheduler", "optimizer"), 1),
                              "field 'scheduler' entry 'optimizer' is not an entry of LambdaLR's state_dict"),
    "scaler without fp16": ("polar", _set(("scaler",), {"scale": 1.0}),
                            "field 'scaler' must be None (this run does not scale the loss)"),
    "loss step past the run": ("polar", _set(("loss_step",), 10 ** 6),
                               "field 'loss_step' must be an int in [0, 4], got 1000000"),
    "dual shift": ("polar", _set(("dual_shift",), 2.0),
                   "field 'dual_shift' must be a finite number in [-1.0, 1.0], got 2.0"),
    "dual shift NaN": ("polar", _set(("dual_shift",), float("nan")), "field 'dual_shift' must be a finite number"),
    "pruner where there is none": ("polar", _set(("pruner",), {}), "field 'pruner' must be None"),
    "mask of the wrong shape": ("fggp", _set(("pruner", "masks", 0), torch.ones(3, dtype=torch.bool)),
                                "field 'pruner' entry 'masks'[0] must be a tensor of shape (16, 16, 3, 3) and "
                                "dtype torch.bool"),
    "masks as floats": ("fggp", lambda s: s["pruner"]["masks"].__setitem__(0, s["pruner"]["masks"][0].float()),
                        "field 'pruner' entry 'masks'[0] must be a tensor"),
    "pruner of another schedule": ("fggp", _set(("pruner", "config", "update_every"), 2),
                                   "field 'pruner' entry 'config' must be"),
    "pruner step past the run": ("fggp", _set(("pruner", "t"), 99),
                                 "field 'pruner' entry 't' must be an int in [0, 4], got 99"),
    "lost mask update": ("fggp", lambda s: s["pruner"]["updates"].pop(),
                         "field 'pruner' entry 'updates' must have 2 entries, got 1"),
    "update record without k": ("fggp", lambda s: s["pruner"]["updates"][0].pop("k"),
                                "field 'pruner' entry 'updates'[0]['k'] is missing"),
    "history one epoch short": ("polar", lambda s: s["history"]["test_accuracy"].clear(),
                                "field 'history' entry 'test_accuracy' must have 1 entry, got 0"),
    "history accuracy above 1": ("fggp", _set(("history", "test_accuracy", 0), 7.0),
                                 "field 'history' entry 'test_accuracy'[0] must be a finite number in [0, 1]"),
    "history unknown field": ("polar", _set(("history", "extra"), []),
                              "field 'history' entry 'extra' is not an entry of the trainer's history"),
    "history epochs": ("polar", _set(("history", "epoch"), [2]), "field 'history' entry 'epoch' must be [1, ..., 1]"),
    "gate statistics without gates": ("fggp", _set(("history", "polarized"), [0.5]),
                                      "field 'history' entry 'polarized' must have 0 entries, got 1"),
    "histogram of 19 bins": ("polar", lambda s: s["history"]["histogram"][0].pop(),
                             "field 'history' entry 'histogram'[0] must have 20 entries, got 19"),
    "budget without its reason": ("polar", lambda s: s["history"]["budget"].pop("reason"),
                                  "field 'history' entry 'budget'['reason'] is missing"),
    "rng of another size": ("polar", _set(("rng",), torch.zeros(7, dtype=torch.uint8)),
                            "field 'rng' must be a tensor of shape (5056,)"),
    "rng bytes that are no state": ("polar", lambda s: s["rng"].fill_(255),
                                    "field 'rng' is not a state of the random generator"),
    "world size 0": ("fggp", _set(("world_size",), 0), "field 'world_size' must be an int >= 1, got 0"),
    "extra field": ("fggp", _set(("extra",), 1), "field 'extra' is not an entry of a checkpoint"),
    "gated model of the wrong shape": ("polar", lambda s: s["gated_model"].update(
        {"layer1.0.conv1.weight": s["gated_model"]["layer1.0.conv1.weight"][:-1].clone()}),
        "field 'gated_model' entry 'layer1.0.conv1.weight' must be a tensor of shape (16, 16, 3, 3)"),
    "switched without the gated model": ("polar", lambda s: s.pop("gated_model"), "field 'gated_model' is missing"),
    "spec not a dict": ("polar", _set(("spec",), [1]), "field 'spec' must be a dict, got [1]"),
    "spec of another extraction": ("polar", lambda s: s["spec"]["groups"][1]["kept"].pop(),
                                   "field 'spec' does not match the gated model"),
    "switched where the run keeps the gated network": (
        "polar-gated", lambda s: s.update(spec={}, gated_model=s["model"]),
        "field 'spec' is there, but this run does not switch to the extracted network"),
    "shrink where the run does not shrink": ("polar", _set(("shrink",), {}),
                                             "field 'shrink' is there, but this run does not shrink"),
    "shrink state lost": ("polar-shrink", lambda s: s.pop("shrink"), "field 'shrink' is missing"),
    "shrink streak of another dtype": (
        "polar-shrink", lambda s: s["shrink"].update(streak=s["shrink"]["streak"].float()),
        "field 'shrink' entry 'streak' must be a tensor of shape"),
    "every gate removed": ("polar-shrink", lambda s: s["shrink"]["removed"].fill_(True),
                           "field 'shrink' entry 'removed' names gates whose channels cannot be removed"),
    "config value a tensor": ("polar", _set(("config", "epochs"), torch.tensor([2, 2])),
                              "was written with epochs=a tensor of shape (2,)"),
}


@pytest.mark.parametrize("edit", SCHEMA_EDITS)
def test_tampered_field_is_named(runs, tmp_path, edit):
    method, change, fragment = SCHEMA_EDITS[edit]
    run = runs[method]
    folder = _edited(run, tmp_path, change)
    with pytest.raises(CheckpointError) as info:
        _load(run, folder / "checkpoint.pt")
    message = str(info.value)
    assert str(folder / "checkpoint.pt") in message and fragment in message, message


def test_scaler_state_is_checked_when_the_run_scales_the_loss(runs, tmp_path):
    run = runs["fggp"]
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    load = (*run.load[:3], dataclasses.replace(run.expected, scaler=scaler))
    good = _edited(run, tmp_path, _set(("scaler",), scaler.state_dict()))
    assert content_digest(Checkpointer(good / "checkpoint.pt").load(*load)["scaler"]) == \
        content_digest(scaler.state_dict())
    for value, fragment in [(None, "field 'scaler' must be a dict, got None"),
                            ({**scaler.state_dict(), "scale": float("nan")}, "field 'scaler' entry 'scale'"),
                            ({**scaler.state_dict(), "growth_factor": 3.0}, "entry 'growth_factor' must be 2.0")]:
        folder = _edited(run, tmp_path, _set(("scaler",), value))
        with pytest.raises(CheckpointError, match="field 'scaler'") as info:
            Checkpointer(folder / "checkpoint.pt").load(*load)
        assert fragment in str(info.value)


# ----------------------------------------------------------------------------- (4) damaged files

def _flip_bytes(path: Path, rng: random.Random, n: int) -> None:
    data = bytearray(path.read_bytes())
    for i in rng.sample(range(len(data)), n):
        data[i] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flipped_bytes_are_refused(runs, tmp_path, capsys, seed):
    for run in runs.values():
        folder = _copy(run, tmp_path)
        _flip_bytes(folder / "checkpoint.pt", random.Random(seed), 64)
        rc, err = _resume(run, folder, capsys)
        _assert_refused(rc, err)
        assert "corrupt" in err or "digest" in err, err


def test_tampered_but_redigested_checkpoint_gets_the_schema_refusal(runs, tmp_path, capsys):
    run = runs["polar-gated"]
    folder = _edited(run, tmp_path, lambda s: _narrow(s, "fc.weight"))
    rc, err = _resume(run, folder, capsys)
    _assert_refused(rc, err, "field 'model' entry 'fc.weight' must be a tensor of shape (10, 64)")
    assert "do not match its digest" not in err


# ----------------------------------------------------------------------------- (5) any mutation

def _walk(value, at=()):
    """(path, value) of ``value`` and everything inside it (dict entries, list items); the config's entries
    are left out: load compares them with the run's options, where a key at its default may be absent and
    the resume-free ones may differ by design (tests/test_cli.py covers it)."""
    yield at, value
    if at == ("config",):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, at + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, at + (i,))


def _kind(v):
    if isinstance(v, bool) or v is None:
        return type(v)
    if isinstance(v, (int, float)):
        return int if isinstance(v, int) else float
    return torch.Tensor if isinstance(v, torch.Tensor) else type(v)


OTHER_TYPES = ["x", [1], {"a": 1}, True, 2.5, 7, None, torch.zeros(1)]


def _retypes(at, v):
    """Values of another type for ``v``: never an int for a float (both are numbers), never a str for the
    budget's reason (None or a message)."""
    same = {_kind(v)} | ({int} if isinstance(v, float) else set()) | ({str} if at[-1:] == ("reason",) else set())
    return [o for o in OTHER_TYPES if _kind(o) not in same]


def _mutations(state):
    """(description, path, new value or DROP) for every mutation of ``state`` the property tries."""
    for at, v in _walk(state):
        if not at:
            continue
        in_sgd_state = at[:2] == ("optimizer", "state") and len(at) == 3   # SGD may lack a parameter's entry
        if not in_sgd_state:
            yield "drop", at, DROP
        for other in _retypes(at, v):
            yield "retype", at, other
        if _kind(v) is int:
            yield "negative", at, -3
        elif _kind(v) is float:
            for bad in (float("nan"), float("inf"), -float("inf")):
                yield "non-finite", at, bad
        elif isinstance(v, torch.Tensor):
            if v.is_floating_point() and v.numel():   # integer and bool tensors (counts, masks) have no range
                yield "non-finite entry", at, _with_nan(v)
            yield "reshaped", at, v.reshape(-1)[:-1].clone() if v.numel() > 1 else v.reshape(-1).repeat(2)
            yield "recast", at, v.to(torch.int16 if v.dtype != torch.int16 else torch.float32)


DROP = object()


def _with_nan(t):
    t = t.clone()
    t.view(-1)[t.numel() // 2] = float("nan")
    return t


def _apply(state, at, value):
    state = copy.deepcopy(state)
    *head, last = at
    parent = state
    for key in head:
        parent = parent[key]
    if value is DROP:
        del parent[last]
    else:
        parent[last] = value
    return state


@pytest.fixture(scope="module")
def mutations(runs):
    return {name: list(_mutations(run.state)) for name, run in runs.items()}


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_checkpoint_is_refused_or_unchanged(runs, mutations, tmp_path, data):
    """Any single mutation, written well-formed (re-digested), or any bytes of the file flipped: load with the
    Expected of a real --resume raises CheckpointError or returns the original state; nothing else."""
    method = data.draw(st.sampled_from(sorted(runs)), label="method")
    run = runs[method]
    path = tmp_path / f"{method}.pt"
    if data.draw(st.integers(0, 4), label="flip bytes?") == 0:
        shutil.copyfile(run.folder / "checkpoint.pt", path)
        _flip_bytes(path, random.Random(data.draw(st.integers(0, 2 ** 32), label="seed")),
                    data.draw(st.integers(1, 64), label="bytes"))
        mutated = False
    else:
        # a top-level field first (so the model's 129 entries do not drown the rest), then a mutation inside it
        field = data.draw(st.sampled_from(FIELDS), label="field")
        inside = [m for m in mutations[method] if m[1][0] == field]
        kind, at, value = data.draw(st.sampled_from(inside), label="mutation")
        Checkpointer(path).save(_apply(run.state, at, value))
        mutated = True
    try:
        state = Checkpointer(path).load(*run.load)
    except CheckpointError:
        return
    assert not mutated, f"{kind} at {at} was accepted"
    assert content_digest(state) == content_digest(run.state)


def test_a_checkpoint_larger_than_the_model_allows_is_refused_before_loading(tmp_path, monkeypatch):
    import polarprune_cuda as pp
    from polarprune_cuda.train import checkpoint as ck

    model = pp.resnet20(num_classes=10, in_channels=1)
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"x")
    with open(path, "r+b") as f:
        f.truncate(ck.max_bytes(model) + 1)               # sparse file: no disk used
    loaded = []
    monkeypatch.setattr(ck.torch, "load", lambda *a, **k: loaded.append(1))
    expected = ck.Expected(model=model, optimizer=None, scheduler=None, scaler=None, pruner=None, epochs=1,
                           steps_per_epoch=1, gated=False)
    with pytest.raises(ck.CheckpointError, match="more than a checkpoint of this model can have"):
        ck.Checkpointer(path).load({}, expected=expected)
    assert not loaded


# ----------------------------------------------------------------------------- (6) fields that disagree

def test_a_schedule_put_back_to_the_start_is_refused(runs, tmp_path, capsys):
    def rewind(state):
        state["scheduler"]["last_epoch"], state["scheduler"]["_step_count"] = 0, 1

    folder = _edited(runs["polar-gated"], tmp_path, rewind)
    rc, err = _resume(runs["polar-gated"], folder, capsys)
    steps = runs["polar-gated"].expected.steps_per_epoch
    _assert_refused(rc, err, "'last_epoch'", f"is 0, and the 1 epochs done are {steps} steps")


@pytest.mark.parametrize("method", ["polar", "polar-gated"])
@pytest.mark.parametrize("forge,named", [
    (lambda b: b.update(achieved_cost=0.1 * b["total"], achieved_sparsity=0.9), "its achieved_cost is"),
    (lambda b: b.update(total=2 * b["total"]), "its total is"),
    (lambda b: b.update(target_sparsity=0.9), "is for target 0.9 of"),
])
def test_a_budget_the_gates_do_not_give_is_refused(runs, tmp_path, capsys, method, forge, named):
    run = runs[method]
    assert run.state["history"]["budget"], "the interrupted run's gates froze in its first epoch"
    folder = _edited(run, tmp_path, lambda s: forge(s["history"]["budget"]))
    rc, err = _resume(run, folder, capsys)
    _assert_refused(rc, err, "field history.budget", named)


@pytest.mark.parametrize("edit,named", [
    (lambda s: s["history"].__setitem__("epoch_macs", [10 ** 400]),
     "entry 'epoch_macs'[0] must be an int in [0, 9223372036854775807]"),
    (lambda s: s["optimizer"]["param_groups"][0].__setitem__("lr", 1e300), "is 1e+300, and the schedule gives"),
    (lambda s: s["history"].__setitem__("energy", {"dense": torch.ones(3)}), "must be plain data"),
    (lambda s: s["history"].__setitem__("energy", {"x": [[[[[[[[[[1]]]]]]]]]]}), "nested deeper"),
])
def test_values_that_pass_their_type_and_then_overflow_are_refused(runs, tmp_path, capsys, edit, named):
    folder = _edited(runs["polar-gated"], tmp_path, edit)
    rc, err = _resume(runs["polar-gated"], folder, capsys)
    _assert_refused(rc, err, named)
