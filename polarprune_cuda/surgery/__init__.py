"""The surgery layer: gate any CNN in one call, meet the budget, extract the static sub-network, save and load it.

``attach.py``: attach_gates; ``extract.py``: extract, kept_channels, predicted_count/depth, removed_blocks;
``spec.py``: the channel spec, save_pruned / load_pruned; ``costs.py``: count and the exact cost models;
``tp.py``: the Torch-Pruning adapter (grouping, channel removal); ``inputs.py``: example inputs, eval mode,
output flattening; ``blocks.py``: residual blocks, ClosedBlock, depth; ``budget.py``: meet_target, the exact
budget; ``latency.py``: latency_cost, the measured latency cost model.
"""
from ..errors import UnsupportedModelError
from .attach import attach_gates, scores_from_magnitude
from .blocks import ClosedBlock, depth
from .budget import BudgetResult, meet_target, select_gates
from .costs import count
from .extract import extract, kept_channels, predicted_count, predicted_depth, removed_blocks
from .latency import LatencyCost, latency_cost
from .spec import load_pruned, save_pruned, spec_digest

__all__ = ["BudgetResult", "ClosedBlock", "LatencyCost", "UnsupportedModelError", "attach_gates", "count", "depth",
           "extract", "kept_channels", "latency_cost", "load_pruned", "meet_target", "predicted_count",
           "predicted_depth", "removed_blocks", "save_pruned", "scores_from_magnitude", "select_gates", "spec_digest"]
