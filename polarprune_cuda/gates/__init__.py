"""The gate layer: gate modules, the flat gate bank of a model, its cost models and the penalty.

``modules.py``: ChannelGate, GatedBatchNorm2d, GatedConv2d, GatedLinear and class swapping;
``bank.py``: the GateBank, bind_gates and the bank's install, removal and flat view;
``cost.py``: exact cost models (channels, params, MACs) over the bank;
``loss.py``: PolarizationLoss and gate statistics. Uses the op layer only.
"""
