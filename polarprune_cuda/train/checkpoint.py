"""Training checkpoints: atomic, self-verifying, validated before use.

A checkpoint is a ``torch.save`` of a dict (readable with
``torch.load(weights_only=True)``); its ``"digest"`` entry is the
:func:`~polarprune_cuda._io.content_digest` of everything else, so a damaged
or edited file is refused instead of resuming into a different model.
Before anything is restored, the contents are compared with the state the run
would save itself (:class:`Expected`, :mod:`.checkpoint_schema`): every failure
is a :class:`CheckpointError` naming the file and the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write, check_archive, content_digest, load_failure
from ..errors import CheckpointError, IntegrityError
from .checkpoint_schema import (  # noqa: F401  re-exported: the constants and validate are this module's too
    CHECKPOINT_FORMAT,
    FIELDS,
    HISTOGRAM_BINS,
    SWITCH_FIELDS,
    same_value,
    show_value,
    validate,
)

DIGEST_KEY = "digest"


@dataclass
class Expected:
    """What the resuming run has, to compare a checkpoint's contents with before restoring them."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    pruner: Any
    epochs: int
    steps_per_epoch: int
    gated: bool
    #: ``saved(model=, optimizer=, scheduler=, scaler=, pruner=, gated_model=None)``: the state the run would save
    #: with these objects in it (train.loop's own checkpoint function), what a checkpoint is compared with
    saved: Any = None
    #: for a checkpoint written after the switch to the extracted network: ``switch(gated, gated_state, spec)`` gives
    #: the run's train.switch.Switched (extracted network, optimizer, schedule) to check it against; the
    #: checks leave it in ``built`` for the restore
    switch: Any = None
    built: Any = None
    #: for a run with --shrink-every: ``shrink(removed)`` gives the gated model without the removed gates'
    #: channels (a train.switch.Switched) that a checkpoint of it is checked against; left in ``shrunk``
    shrink: Any = None
    shrunk: Any = None


def max_bytes(model: torch.nn.Module) -> int:
    """An upper bound on a checkpoint of ``model``: the weights, a momentum buffer and pruner masks for each
    (four times the state), plus 64 MiB for the history and the bookkeeping."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 4 * state + 64 * 2 ** 20


class Checkpointer:
    """Atomic checkpoints (write to a temp file in the same folder, then rename) with a content digest inside."""

    def __init__(self, path):
        self.path = Path(path)

    def save(self, state: dict) -> None:
        state = {k: v for k, v in state.items() if k != DIGEST_KEY}
        state[DIGEST_KEY] = content_digest(state)
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))

    def _refuse(self, why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {self.path}: {why}; delete it or use another --out")

    def load(self, config: dict, defaults: dict | None = None, resume_free: tuple = (),
             expected: Expected | None = None) -> dict:
        """The checkpoint's state after verifying its digest, its config against ``config`` (keys in
        ``resume_free`` may differ; a key the checkpoint lacks may be at its value in ``defaults``) and, with
        ``expected``, its contents against the run's model, optimizer and schedule."""
        if expected is not None:
            limit = max_bytes(expected.model)
            size = self.path.stat().st_size
            if size > limit:
                raise self._refuse(f"it has {size} bytes, more than a checkpoint of this model can have "
                                   f"({limit}); it is not this run's checkpoint")
        try:
            check_archive(self.path, f"checkpoint {self.path}")
        except IntegrityError as exc:
            raise CheckpointError(f"{exc}; delete it or use another --out") from None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {self.path} is corrupt or not a polarprune checkpoint "
                                  f"({load_failure(exc)}); delete it or use another --out") from None
        if not isinstance(state, dict) or not same_value(state.get("format"), CHECKPOINT_FORMAT):
            got = ("it holds " + show_value(state) if not isinstance(state, dict) else
                   "its field 'format' " + (f"is {show_value(state['format'])}" if "format" in state else "is missing"))
            raise CheckpointError(f"checkpoint {self.path} is not a polarprune checkpoint of format "
                                  f"{CHECKPOINT_FORMAT} ({got}); delete it or use another --out")
        digest = state.pop(DIGEST_KEY, None)
        if not isinstance(digest, str):
            raise self._refuse("it has no digest, so its contents cannot be verified")
        try:
            actual = content_digest(state)
        except (TypeError, RecursionError) as exc:   # an object a checkpoint never holds, or a cycle
            raise self._refuse(f"it holds data of a kind a checkpoint never has ({type(exc).__name__}: "
                               f"{exc})") from None
        if actual != digest:
            raise self._refuse("its contents do not match its digest (the file was changed or damaged after it "
                               "was written)")
        saved = state.get("config")
        if not isinstance(saved, dict):
            raise self._refuse("field 'config' is missing" if "config" not in state else
                               f"field 'config' must be a dict, got {show_value(saved)}")
        defaults = defaults or {}
        for key, value in config.items():
            if key in resume_free:
                continue
            if key not in saved and key in defaults and value == defaults[key]:
                continue   # an option added after the checkpoint was written, left at its default
            if not _plain_equal(saved.get(key), value):
                raise CheckpointError(
                    f"checkpoint {self.path} was written with {key}={show_value(saved.get(key))}, this run asks for "
                    f"{key}={value!r}; resume with the same options or use another --out")
        if expected is not None:
            validate(state, expected, self.path)
        return state


def _plain_equal(a, b) -> bool:
    """``a == b`` for config values (JSON-like data); False for anything else (a tensor) instead of raising."""
    def plain(v, depth=0):
        if depth > 16:
            return False
        if v is None or isinstance(v, (bool, int, float, str)):
            return True
        if isinstance(v, (list, tuple)):
            return all(plain(x, depth + 1) for x in v)
        if isinstance(v, dict):
            return all(plain(k, depth + 1) and plain(x, depth + 1) for k, x in v.items())
        return False

    return plain(a) and plain(b) and a == b
