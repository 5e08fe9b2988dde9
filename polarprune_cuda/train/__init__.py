"""The application layer: recipes, the training loop, checkpoints, run folders, data, reports, torchrun.

``onepass.py``: OnePass, the one-pass recipe in a user's own loop (any optimizer of torch.optim);
``switch.py``: moving training to the extracted network; ``config.py``: PruneConfig (the recipe, its checks
and the names its options choose from); ``optim.py``: the optimizer and the schedules; ``loop.py``: the
training loop (fit_loop), evaluate, History; ``runs.py``: the run drivers (run_prune, run_sparse, run_dense);
``trainer.py``: the public face, re-exporting those; ``checkpoint.py``: verified checkpoints;
``checkpoint_schema.py``: a loaded checkpoint compared with the state the run would save; ``rundir.py``: manifest
and lock of an output folder; ``distributed.py``: torchrun; ``data.py``: the offline data sets; ``folder.py``: image
folders streamed from disk; ``weights.py``: ``--init`` weights; ``report.py``, ``plots.py`` and ``energy.py``:
what a run measures, writes and draws.
"""
from .config import PruneConfig
from .loop import evaluate
from .onepass import OnePass
from .optim import split_parameters

__all__ = ["OnePass", "PruneConfig", "evaluate", "split_parameters"]
