"""The application layer: recipes, the training loop, checkpoints, run folders, data, reports, torchrun.

The face: :class:`OnePass` (the one-pass recipe in a user's own loop, any optimizer of torch.optim),
:class:`PruneConfig` and :func:`run_prune` (the CLI's recipe and its run driver, with :func:`run_sparse` and
:func:`run_dense`), :func:`make_optimizer`, :func:`split_parameters`, :func:`penalty_schedule`,
:func:`lr_lambdas`, :func:`evaluate`, :class:`History` and :class:`Checkpointer`.

``onepass.py``: OnePass; ``switch.py``: moving training to the extracted network; ``config.py``: PruneConfig
(the recipe, its checks and the names its options choose from); ``optim.py``: the optimizer and the
schedules; ``loop.py``: the training loop (fit_loop), evaluate, History; ``runs.py``: the run drivers;
``checkpoint.py``: verified checkpoints; ``checkpoint_schema.py``: a loaded checkpoint compared with the state
the run would save; ``rundir.py``: manifest and lock of an output folder; ``distributed.py``: torchrun;
``data.py``: the offline data sets; ``folder.py``: image folders streamed from disk; ``weights.py``: ``--init``
weights; ``report.py``, ``plots.py`` and ``energy.py``: what a run measures, writes and draws.

Patch a name in the module that uses it (e.g. ``runs.build``), not here: a patch here reaches only callers
of the face.
"""
from .checkpoint import Checkpointer
from .config import PruneConfig
from .loop import History, evaluate
from .onepass import OnePass
from .optim import lr_lambdas, make_optimizer, penalty_schedule, split_parameters
from .runs import PruneResult, SparseResult, run_dense, run_prune, run_sparse

__all__ = ["Checkpointer", "History", "OnePass", "PruneConfig", "PruneResult", "SparseResult", "evaluate",
           "lr_lambdas", "make_optimizer", "penalty_schedule", "run_dense", "run_prune", "run_sparse",
           "split_parameters"]
