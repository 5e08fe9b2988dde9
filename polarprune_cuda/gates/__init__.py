"""The gate layer: gate modules, the flat gate bank of a model, its cost models and the penalty.

``modules.py``: ChannelGate, GatedBatchNorm2d, the GateBank and class swapping;
``cost.py``: exact cost models (channels, params, MACs) over the bank;
``loss.py``: PolarizationLoss and gate statistics. Uses the op layer only.
"""
