"""Costs: :func:`count` (params and MACs of a model) and the exact cost models of a gated model
(params, MACs and channels as functions of the gates).

:func:`cost_models` builds the ``params`` and ``macs`` :class:`~polarprune_cuda.ops.cost.CostModel` s
(constant, linear and bilinear terms; a branch module's terms are multiplied by its block gate),
:func:`channel_cost_model` the ``channels`` model with block gates, :func:`block_exactness` drops the
blocks whose cost one gate per segment cannot express, and :func:`io_shapes` measures the output
positions per sample that MACs scale with.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from ..errors import UnsupportedModelError
from ..gates.bank import GateBank, find_bank
from ..ops.cost import CostModel
from .blocks import BlockRecord
from .inputs import as_inputs, check_model_arg, run_hooked, score_ids
from .tp import Plan

#: (block gate segment, channel segments inside its branch) of a branch module; None outside every branch
Block = tuple[int, set[int]] | None


def io_shapes(model: nn.Module, inputs) -> dict[nn.Module, int]:
    """Per conv/linear: output elements per sample / output channels (the positions its MACs repeat over)."""
    spatial: dict[nn.Module, int] = {}

    def hook(module, args, out):
        per_sample = out[0].numel() if out.dim() > 1 else 1
        channels = out.shape[1] if isinstance(module, nn.Conv2d) else out.shape[-1]
        spatial[module] = per_sample // channels

    run_hooked(model, inputs, [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))], hook)
    return spatial


def count(model: nn.Module, example_inputs) -> dict[str, int]:
    """Params and MACs (per sample, multiply-accumulates of Conv2d and Linear layers) of ``model``.

    Gate scores are not counted: they disappear at extraction.
    """
    check_model_arg(model)
    inputs = as_inputs(example_inputs)
    skip = score_ids(model)
    params = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    macs = 0
    for m, positions in io_shapes(model, inputs).items():
        if isinstance(m, nn.Conv2d):
            k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
            macs += positions * m.out_channels * k
        else:
            macs += positions * m.out_features * m.in_features
    return {"params": int(params), "macs": int(macs)}


@dataclass
class _Terms:
    """One cost kind being built: linear terms per segment, pair terms per (segment, segment), a constant."""

    linear: dict[int, float] = field(default_factory=dict)
    pairs: dict[tuple[int, int], float] = field(default_factory=dict)
    const: float = 0.0


def _lin(terms: _Terms, block: Block, a: int, c: float) -> None:
    """Add ``c * g_a``, times the module's block gate (inside the branch the penalty already scales g_a by it)."""
    if block is None or a in block[1]:
        terms.linear[a] = terms.linear.get(a, 0.0) + c
    else:
        key = (a, block[0])
        terms.pairs[key] = terms.pairs.get(key, 0.0) + c


def _pair(terms: _Terms, block: Block, a: int, b: int, c: float) -> None:
    """Add ``c * g_a * g_b`` (a third gate, the block's, is refused earlier, in block_exactness)."""
    if block is not None and a not in block[1] and b not in block[1]:
        raise UnsupportedModelError("a branch layer maps gated channels outside its block to gated channels "
                                    "outside its block")   # refused earlier, in block_exactness
    terms.pairs[(a, b)] = terms.pairs.get((a, b), 0.0) + c


def _fixed(terms: _Terms, block: Block, c: float) -> None:
    """Add the constant ``c``, times the module's block gate."""
    if block is None:
        terms.const += c
    else:
        terms.linear[block[0]] = terms.linear.get(block[0], 0.0) + c


def _add_product(terms: _Terms, block: Block, coef: float, left, f_left, right, f_right) -> None:
    """Add ``coef * (sum_left m_a g_a + f_left) * (sum_right m_b g_b + f_right)`` (gated and fixed channels)."""
    for a, ma in left:
        _lin(terms, block, a, coef * ma * f_right)
        for b, mb in right:
            _pair(terms, block, a, b, coef * ma * mb)
    for b, mb in right:
        _lin(terms, block, b, coef * mb * f_left)
    _fixed(terms, block, coef * f_left * f_right)


def _add_linear(terms: _Terms, block: Block, coef: float, items, f) -> None:
    """Add ``coef * (sum m_a g_a + f)``."""
    for a, ma in items:
        _lin(terms, block, a, coef * ma)
    _fixed(terms, block, coef * f)


def _segment_shares(plans: list[Plan], sizes: list[int]):
    """Per module, the segments of its output and of its input channels as (segment, share of the segment's
    gates), and how many of its output and input channels the segments cover."""
    outs: dict[nn.Module, list[tuple[int, float]]] = {}
    ins: dict[nn.Module, list[tuple[int, float]]] = {}
    covered_out: dict[nn.Module, int] = {}
    covered_in: dict[nn.Module, int] = {}
    for k, plan in enumerate(plans):
        for module, idxs, _ in plan.outputs:
            outs.setdefault(module, []).append((k, len(idxs) / sizes[k]))
            covered_out[module] = covered_out.get(module, 0) + len(idxs)
        for module, idxs, _ in plan.inputs:
            ins.setdefault(module, []).append((k, len(idxs) / sizes[k]))
            covered_in[module] = covered_in.get(module, 0) + len(idxs)
    return outs, ins, covered_out, covered_in


def _add_module(m: nn.Module, params: _Terms, macs: _Terms, block: Block, shares, positions: int) -> bool:
    """Add the params and MACs terms of one Conv2d, Linear or affine BatchNorm2d; False for other modules."""
    outs_of, ins_of, covered_out, covered_in = shares
    outs, ins = outs_of.get(m, []), ins_of.get(m, [])
    if isinstance(m, nn.Conv2d):
        f_out = m.out_channels - covered_out.get(m, 0)
        kk = m.weight.shape[2] * m.weight.shape[3]
        if is_depthwise(m):   # in == out
            _add_linear(params, block, kk + (m.bias is not None), outs, f_out)
            _add_linear(macs, block, kk * positions, outs, f_out)
            return True
        f_in = m.in_channels - covered_in.get(m, 0)
        _add_product(params, block, kk / m.groups, ins, f_in, outs, f_out)
        _add_product(macs, block, positions * kk / m.groups, ins, f_in, outs, f_out)
    elif isinstance(m, nn.Linear):
        f_out = m.out_features - covered_out.get(m, 0)
        f_in = m.in_features - covered_in.get(m, 0)
        _add_product(params, block, 1.0, ins, f_in, outs, f_out)
        _add_product(macs, block, float(positions), ins, f_in, outs, f_out)
    elif isinstance(m, nn.BatchNorm2d) and m.affine:
        _add_linear(params, block, 2.0, outs, m.num_features - covered_out.get(m, 0))
        return True
    else:
        return False
    if m.bias is not None:
        _add_linear(params, block, 1.0, outs, f_out)
    return True


def cost_models(model, plans: list[Plan], sizes: list[int], spatial,
                blocks: list[tuple[int, set, set[int]]] = ()) -> dict[str, CostModel]:
    """Exact params and MACs as functions of the gates (see cost.py).

    ``plans`` are the groups that have gate segments 0..K-1 (``sizes``).
    ``blocks`` lists (block segment, modules of its branch, channel segments
    inside the branch). Every cost of a branch module is multiplied by its
    block gate: a constant becomes linear in the block gate, a term linear in
    a segment outside the branch becomes a pair with the block gate, and terms
    in segments inside the branch stay as they are, because the penalty feeds
    those segments the effective probabilities ``p_j * p_block``
    (:meth:`GateBank.effective_scores`).
    """
    shares = _segment_shares(plans, sizes)
    block_of_module = {id(m): (seg, internal) for seg, members, internal in blocks for m in members}
    params, macs = _Terms(), _Terms()
    counted = set()
    bank = find_bank(model)
    for m in model.modules():
        if m is bank:
            continue
        if _add_module(m, params, macs, block_of_module.get(id(m)), shares, spatial.get(m, 0)):
            counted.update(id(p) for p in m.parameters(recurse=False))
    skip = counted | score_ids(model)
    params.const += sum(p.numel() for p in model.parameters() if id(p) not in skip)
    n = sum(sizes)
    return {kind: CostModel.from_terms(n, sizes, t.linear, t.pairs, t.const)
            for kind, t in (("params", params), ("macs", macs))}


def _group_modules(plan: Plan, names) -> set[str]:
    """Names of every module of a group (its producers, BatchNorms and consumers)."""
    return {names[m] for m, _, _ in plan.outputs + plan.inputs}


def block_exactness(block_records: list[BlockRecord], plans: list[Plan], names, auto: bool) -> list[BlockRecord]:
    """Find each block's inside channel segments; drop blocks whose cost is not exact with one gate per segment.

    A segment is inside a block when every module of its group is in the
    branch. A branch layer that maps gated channels outside the block to gated
    channels outside the block would make its cost a product of three gates,
    which the penalty op does not represent: such a block is skipped (warned)
    or, when the user named it, refused.
    """
    sides: dict[str, set[tuple[str, int]]] = {}   # module name -> ("out" | "in", segment) of the groups it is in
    for k, plan in enumerate(plans):
        for m, _, _ in plan.outputs:
            sides.setdefault(names[m], set()).add(("out", k))
        for m, _, _ in plan.inputs:
            sides.setdefault(names[m], set()).add(("in", k))
    kept = []
    for brec in block_records:
        branch = set(brec.branch)
        brec.internal = [k for k, plan in enumerate(plans) if _group_modules(plan, names) <= branch]
        bad = None
        for layer in brec.branch:
            tags = sides.get(layer, set())
            outs = {k for side, k in tags if side == "out" and k not in brec.internal}
            ins = {k for side, k in tags if side == "in" and k not in brec.internal}
            if outs and ins:
                bad = layer
                break
        if bad is None:
            kept.append(brec)
            continue
        message = (f"block {brec.name!r} is not block-gated: its layer {bad!r} maps gated channels outside the "
                   "block to gated channels outside the block (add that layer's group to ignored_layers to gate it)")
        if not auto:
            raise UnsupportedModelError(message)
        warnings.warn(message, stacklevel=3)
    return kept


def channel_cost_model(bank: GateBank, all_plans, plans, block_records, names) -> CostModel | None:
    """``channels`` cost with block gates: each channel gate costs 1; a block gate costs the channels of
    its branch that no channel gate covers (with channel gates on, those inside the branch count
    through ``p_j * p_block`` already)."""
    gated = {id(p) for p in plans}
    linear = {k: 1.0 for k in range(len(plans))}
    for brec in block_records:
        branch = set(brec.branch)
        linear[brec.segment] = float(sum(p.channels for p in all_plans if id(p) not in gated
                                         and _group_modules(p, names) <= branch))
    if not any(linear.values()):
        return None
    return CostModel.from_terms(bank.scores.numel(), bank.sizes, linear, {}, 0.0)


@dataclass
class Site:
    """One Conv2d, Linear or BatchNorm2d of a gated model and the gates its width depends on: its kept input
    channels are ``sum_a share_a * S[a] + f_in`` and its kept output channels ``sum_b share_b * S[b] + f_out``
    (``S[k]``: the sum of segment k's gates), times its block gate inside a gated branch."""

    name: str
    module: nn.Module
    ins: list[tuple[int, float]]
    f_in: int
    outs: list[tuple[int, float]]
    f_out: int
    block: Block

    @property
    def per_channel(self) -> bool:
        return per_channel(self.module)


def is_depthwise(m: nn.Module) -> bool:
    """A depthwise convolution: one filter per channel, as many outputs as inputs."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def per_channel(m: nn.Module) -> bool:
    """A BatchNorm or a depthwise convolution: one width (its channels), no input side."""
    return isinstance(m, nn.BatchNorm2d) or is_depthwise(m)


def widths(m: nn.Module) -> tuple[int, int]:
    """(input, output) channels or features of a Conv2d, Linear or BatchNorm2d."""
    if isinstance(m, nn.BatchNorm2d):
        return m.num_features, m.num_features
    if isinstance(m, nn.Conv2d):
        return m.in_channels, m.out_channels
    return m.in_features, m.out_features


def sites_of(model: nn.Module) -> list[Site]:
    """Every Conv2d, Linear and BatchNorm2d of a model gated by attach_gates, with the segments of its widths
    (from the bank's surgery record)."""
    bank = find_bank(model)
    record = getattr(bank, "surgery", None) if bank is not None else None
    if record is None:
        raise ValueError("model has no gates from attach_gates (call pp.attach_gates(model, example_inputs) first)")
    sizes = bank.sizes
    outs: dict[str, list[tuple[int, float]]] = {}
    ins: dict[str, list[tuple[int, float]]] = {}
    covered = {"out": {}, "in": {}}
    for k, rec in enumerate(record.groups):
        for side, name, idxs, _ in rec.members:
            (outs if side == "out" else ins).setdefault(name, []).append((k, len(idxs) / sizes[k]))
            covered[side][name] = covered[side].get(name, 0) + len(idxs)
    block_of = {n: (b.segment, set(b.internal)) for b in record.blocks for n in b.branch}
    sites = []
    for name, m in model.named_modules():
        if m is bank or not isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            continue
        n_in, n_out = widths(m)
        site = Site(name, m, ins.get(name, []), n_in - covered["in"].get(name, 0), outs.get(name, []),
                    n_out - covered["out"].get(name, 0), block_of.get(name))
        if site.per_channel:
            site.ins, site.f_in = [], 0
        sites.append(site)
    return sites


def fitted_cost_model(n: int, sizes: list[int], sites: list[Site], coefs: dict[str, tuple[float, ...]],
                      const: float) -> CostModel:
    """A cost model from a fitted cost per layer: ``a + b * c_in + c * c_out + d * c_in * c_out`` for the site
    named in ``coefs`` (``a + c * channels`` for a BatchNorm or depthwise convolution), plus ``const``."""
    terms = _Terms(const=float(const))
    for site in sites:
        if site.name not in coefs:
            continue
        a, b, c, d = coefs[site.name]
        _fixed(terms, site.block, a)
        _add_linear(terms, site.block, c, site.outs, site.f_out)
        if not site.per_channel:
            _add_linear(terms, site.block, b, site.ins, site.f_in)
            _add_product(terms, site.block, d, site.ins, site.f_in, site.outs, site.f_out)
    return CostModel.from_terms(n, sizes, terms.linear, terms.pairs, terms.const)
