"""The surgery layer: gate any CNN in one call, meet the budget, extract the static sub-network, save and load it.

``core.py``: attach_gates, extract, count, save_pruned / load_pruned (Torch-Pruning does the grouping and the
channel removal); ``blocks.py``: residual blocks, ClosedBlock, depth; ``budget.py``: meet_target, the exact budget.
"""
from .core import (UnsupportedModelError, attach_gates, count, extract, kept_channels, load_pruned, predicted_count,
                   predicted_depth, removed_blocks, save_pruned, spec_digest)

__all__ = ["UnsupportedModelError", "attach_gates", "count", "extract", "kept_channels", "load_pruned",
           "predicted_count", "predicted_depth", "removed_blocks", "save_pruned", "spec_digest"]
