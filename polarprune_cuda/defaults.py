"""The library's defaults, stated once: every entry point that takes one of these reads it from here.

* :data:`COST` (``"macs"``): what a target sparsity is a fraction of, in the CLI (``--cost``), :class:`OnePass`,
  :func:`meet_target`, :class:`PolarizationLoss` and :func:`gate_stats`. The last two also take gates that know
  no MACs (loose gate modules, a bank bound without example inputs): there the default is ``"channels"``, the
  only cost such gates have (:func:`default_cost`).
* :data:`MIN_CHANNELS` (4): the fewest channels a gated group keeps, in :func:`attach_gates`, :class:`OnePass`
  and the CLI (``--min-channels``).
* :data:`PRETRAINED_FREEZE` (0.01): from pretrained weights the gates freeze at once, on the weights' ranking:
  ``OnePass(pretrained=True)`` and ``polarprune prune --init`` (docs/results.md, from a pretrained model).
"""
from __future__ import annotations

COST = "macs"
#: every cost a target can be a fraction of (``latency``: measured, :func:`~polarprune_cuda.latency_cost`)
COSTS = ("channels", "params", "macs", "latency")
MIN_CHANNELS = 4
PRETRAINED_FREEZE = 0.01


def default_cost(bank) -> str:
    """:data:`COST` where ``bank`` (a GateBank or None) has it registered, else ``"channels"``."""
    if bank is not None and COST in bank.cost_kinds:
        return COST
    return "channels"
