"""A loaded checkpoint is compared with the state the resuming run would save itself (checkpoint_schema.py takes it
from fit_loop's own checkpoint function), so a field fit_loop starts to save is checked without a rule of its own,
and a wrong tensor deep inside a field is named by its path. One tiny dense run (a one-conv CNN, 32 images of
8x8, two steps an epoch), interrupted after its first epoch; the resumes refused restore nothing."""
import copy

import pytest
import torch
from torch import nn

from polarprune_cuda.train import loop
from polarprune_cuda.train.checkpoint import DIGEST_KEY, FIELDS, Checkpointer, CheckpointError
from polarprune_cuda.train.config import PruneConfig
from polarprune_cuda.train.data import ImageData

CFG = PruneConfig(batch_size=16, epochs=2, seed=0)


def _data() -> ImageData:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 8, 8, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    return ImageData("tiny", x[:32], y[:32], x[32:], y[32:], 3, pad=0, flip=False, source="memory")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def _fit(path, resume: bool, model=None):
    return loop.fit_loop(model or _model(), _data(), CFG, Checkpointer(path), gated=False, epochs=2, lr=0.1,
                         resume=resume, progress=False, label="dense", interrupt_after=None if resume else 1)


@pytest.fixture
def checkpoint(tmp_path):
    """The run interrupted after epoch 1: (its checkpoint's path, its state without the digest)."""
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        _fit(path, resume=False)
    state = torch.load(path, weights_only=True)
    del state[DIGEST_KEY]
    return path, state


def _refused(path, state, edit) -> str:
    """The message of the resume from ``state`` edited by ``edit`` (written well-formed), which restores nothing."""
    state = copy.deepcopy(state)
    edit(state)
    Checkpointer(path).save(state)
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError) as info:
        _fit(path, resume=True, model=model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    message = str(info.value)
    assert str(path) in message and "delete it or use another --out" in message, message
    return message


def _with_ema(save):
    """fit_loop's checkpoint function with one more field, as a change of fit_loop would add it (no new rule)."""
    def state(run, *args):
        out = save(run, *args)
        out["ema"] = {"decay": 0.999, "updates": 3, "weights": {k: v.detach().clone()
                                                                for k, v in run.model.state_dict().items()}}
        return out
    return state


def test_a_field_fit_loop_starts_saving_is_checked_without_a_rule_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "_checkpoint_state", _with_ema(loop._checkpoint_state))
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        _fit(path, resume=False)
    state = torch.load(path, weights_only=True)
    del state[DIGEST_KEY]
    assert tuple(state) == FIELDS + ("ema",)
    for edit, fragment in [
        (lambda s: s["ema"]["weights"].update({"5.weight": s["ema"]["weights"]["5.weight"].double()}),
         "field 'ema' entry 'weights'['5.weight'] must be a tensor of shape (3, 4) and dtype torch.float32 as in "
         "this run, got a tensor of shape (3, 4) and dtype torch.float64"),
        (lambda s: s["ema"]["weights"]["1.running_var"].fill_(float("inf")),
         "field 'ema' entry 'weights'['1.running_var'] holds NaN or inf"),
        (lambda s: s["ema"].update(updates=-1), "field 'ema' entry 'updates' must be an int >= 0, got -1"),
        (lambda s: s["ema"].update(updates=3.0), "field 'ema' entry 'updates' must be an int >= 0, got 3.0"),
        (lambda s: s["ema"].update(decay=float("nan")), "field 'ema' entry 'decay' must be a finite number, got nan"),
        (lambda s: s["ema"].pop("weights"), "field 'ema' entry 'weights' is missing"),
        (lambda s: s["ema"].update(other=1), "field 'ema' entry 'other' is not an entry of this run's ema"),
        (lambda s: s.pop("ema"), "field 'ema' is missing"),
    ]:
        message = _refused(path, state, edit)
        assert fragment in message, (fragment, message)
    Checkpointer(path).save(state)   # the checkpoint as written resumes
    assert _fit(path, resume=True).epoch == [1, 2]


def test_a_wrong_tensor_deep_in_the_optimizer_state_is_named_by_its_path(checkpoint):
    path, state = checkpoint
    assert set(state) == set(FIELDS)
    momentum = state["optimizer"]["state"]
    pid = max(momentum)   # the last parameter: the classifier's bias, shape (3,)
    assert tuple(momentum[pid]["momentum_buffer"].shape) == (3,)
    for edit, fragment in [
        (lambda s: s["optimizer"]["state"][pid].update(momentum_buffer=momentum[pid]["momentum_buffer"].double()),
         f"field 'optimizer' entry 'state'[{pid}]['momentum_buffer'] must be a tensor of shape (3,) and dtype "
         "torch.float32 as in this run, got a tensor of shape (3,) and dtype torch.float64"),
        (lambda s: s["optimizer"]["state"][pid].update(momentum_buffer=momentum[0]["momentum_buffer"]),
         f"field 'optimizer' entry 'state'[{pid}]['momentum_buffer'] must be a tensor of shape (3,)"),
        (lambda s: s["optimizer"]["state"][pid].update(step=torch.tensor(1.0)),
         f"field 'optimizer' entry 'state'[{pid}]['step'] is not an entry of SGD's state of a parameter"),
        (lambda s: s["optimizer"]["param_groups"][0].update(nesterov=False),
         "field 'optimizer' entry 'param_groups'[0]['nesterov'] must be True (a bool) as in this run, got False"),
    ]:
        message = _refused(path, state, edit)
        assert fragment in message, (fragment, message)
