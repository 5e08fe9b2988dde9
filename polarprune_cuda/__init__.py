"""polarprune_cuda: one-pass structured pruning for PyTorch CNNs.

Attach learned binary channel gates, train once with a polarization penalty
that drives every gate to 0 or 1 and the network to a target sparsity, and
extract a smaller gate-free network; optionally gate whole residual blocks too.
"""
from . import errors, ops
from .errors import UnsupportedModelError
from .gates import (ChannelGate, GateBank, GatedBatchNorm2d, GatedConv2d, GatedLinear, NonFiniteGateError,
                    PenaltyValue, PolarizationLoss, bind_gates, find_bank, gate_modules, gate_stats, ramp)
from .models import resnet20, resnet32, resnet44, resnet56, resnet110
from .ops import BackendUnavailableError, CostModel, backend_info, functional, reference
from .sparse import FGGP, GMP, AnnealedPruner
from .surgery import (BudgetResult, ClosedBlock, LatencyCost, attach_gates, count, depth, extract, kept_channels,
                      latency_cost, load_pruned, meet_target, predicted_count, predicted_depth, removed_blocks, save_pruned,
                      scores_from_magnitude)
from .train import OnePass, evaluate, split_parameters
from ._version import __version__

__all__ = [
    "AnnealedPruner",
    "BudgetResult",
    "BackendUnavailableError",
    "FGGP",
    "GMP",
    "ChannelGate",
    "ClosedBlock",
    "CostModel",
    "GateBank",
    "GatedBatchNorm2d",
    "GatedConv2d",
    "GatedLinear",
    "UnsupportedModelError",
    "attach_gates",
    "count",
    "depth",
    "extract",
    "kept_channels",
    "LatencyCost",
    "latency_cost",
    "meet_target",
    "load_pruned",
    "predicted_count",
    "predicted_depth",
    "removed_blocks",
    "save_pruned",
    "scores_from_magnitude",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "NonFiniteGateError",
    "OnePass",
    "split_parameters",
    "PenaltyValue",
    "PolarizationLoss",
    "backend_info",
    "bind_gates",
    "find_bank",
    "errors",
    "evaluate",
    "functional",
    "gate_modules",
    "gate_stats",
    "ops",
    "ramp",
    "reference",
    "__version__",
]
