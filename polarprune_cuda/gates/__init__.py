"""The gate layer: gate modules, the flat gate bank of a model and the penalty.

``modules.py``: ChannelGate, GatedBatchNorm2d, GatedConv2d, GatedLinear and class swapping;
``bank.py``: the GateBank, bind_gates and the bank's install, removal and flat view (its cost models, channels,
params and MACs, are the op layer's ``ops/cost.py``);
``loss.py``: PolarizationLoss and gate statistics. Uses the op layer only.
"""
from .bank import GateBank, NonFiniteGateError, bind_gates, find_bank
from .loss import PenaltyValue, PolarizationLoss, gate_stats, ramp
from .modules import ChannelGate, GatedBatchNorm2d, GatedConv2d, GatedLinear, gate_modules

__all__ = ["ChannelGate", "GateBank", "GatedBatchNorm2d", "GatedConv2d", "GatedLinear", "NonFiniteGateError",
           "PenaltyValue", "PolarizationLoss", "bind_gates", "find_bank", "gate_modules", "gate_stats", "ramp"]
