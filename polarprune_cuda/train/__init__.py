"""The application layer: recipes, the training loop, checkpoints, run folders, data, reports, torchrun.

``trainer.py``: PruneConfig and the run drivers (run_prune, run_sparse, run_dense); ``checkpoint.py``: verified,
validated checkpoints; ``rundir.py``: manifest and lock of an output folder; ``distributed.py``: torchrun;
``data.py``: the offline data sets; ``report.py`` and ``energy.py``: what a run measures and writes.
"""
