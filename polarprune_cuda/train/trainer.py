"""One-pass pruning: gated training with the polarization penalty, then extraction (the public face).

:class:`PruneConfig` holds a recipe; :func:`run_prune` trains once (gates and
weights together, the penalty ramped in), writes an atomic checkpoint after
every epoch (``--resume`` continues from it and ends with the same result),
extracts the hard-gate network, measures it and writes the report.

For people with their own loop, the pieces are public: :func:`make_optimizer`
(a parameter group for the gate scores), :func:`penalty_schedule`,
:func:`evaluate`, and :class:`Checkpointer`.

The code lives in ``config.py`` (the recipe), ``optim.py`` (optimizer and schedules), ``loop.py`` (the
training loop, evaluation) and ``runs.py`` (the run drivers); this module re-exports their names. Patch a
name in the module that uses it (e.g. ``runs.build``), not here: a patch here reaches only callers of the
facade. Modules (``data_mod``) and classes (``Checkpointer``) are the same objects as there, so patching
their attributes takes effect everywhere.
"""
from __future__ import annotations

from . import data as data_mod
from . import distributed as dist_mod
from .checkpoint import CHECKPOINT_FORMAT, Checkpointer, CheckpointError, Expected
from .config import (AMP_MODES, COSTS, METHODS, RAMP_FRACTION, TARGET_CONTROLS, WARMUP_FRACTION,
                     PruneConfig)
from .loop import AMP_DTYPES, History, evaluate
from .optim import lr_lambdas, make_optimizer, penalty_schedule
from .runs import (PruneResult, SparseResult, build, default_update_every, run_dense, run_prune, run_sparse,
                   warn_unreachable)

__all__ = [
    "AMP_DTYPES", "AMP_MODES", "CHECKPOINT_FORMAT", "COSTS", "CheckpointError", "Checkpointer", "Expected",
    "History", "METHODS", "PruneConfig", "PruneResult", "RAMP_FRACTION", "SparseResult", "TARGET_CONTROLS",
    "WARMUP_FRACTION", "build", "data_mod", "default_update_every", "dist_mod", "evaluate", "lr_lambdas",
    "make_optimizer", "penalty_schedule", "run_dense", "run_prune", "run_sparse", "warn_unreachable",
]
