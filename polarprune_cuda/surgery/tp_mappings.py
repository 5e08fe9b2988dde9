"""Torch-Pruning's index mappings of ``torch.split`` and ``torch.cat``, made exact.

:mod:`.tp` installs these in place of Torch-Pruning's own while it calls Torch-Pruning
(``tp._exact_splits``) and restores them afterwards:

* :func:`update_split_index_mapping`: each consumer of a split is mapped to the output it reads (from
  the autograd graph), with offsets from the split's own sizes (:func:`split_offsets`);
* :func:`update_concat_index_mapping`: a concatenation's inputs are laid out in argument order;
* :func:`split_can_shrink`: which channels of a split's input can be removed without breaking a split
  whose sizes the model's code fixes.

Where the autograd graph does not say (a tensor read twice by one cat, a split of unknown sizes), the
original Torch-Pruning function runs (``ORIGINAL``).
"""
from __future__ import annotations

#: Torch-Pruning's own functions, kept by tp._exact_splits the first time it replaces them
ORIGINAL: dict = {}


def _tp():
    import torch_pruning as tp

    return tp


def split_output(split_node, out_node) -> int | None:
    """Which output of a split (torch.split / chunk) ``out_node`` reads, from the autograd graph itself."""
    fn = split_node.grad_fn
    for next_fn, number in getattr(out_node.grad_fn, "next_functions", None) or ():
        if next_fn is fn:
            return number
    return None


def update_split_index_mapping(graph, split_node) -> None:
    """Torch-Pruning's split index mapping, with each consumer mapped to the split output it reads.

    Torch-Pruning numbers a split's consumers in the order it found them and gives consumer ``i`` the
    ``i``-th output's channel offsets; where one output has two consumers, or the second output is
    consumed first (CSP stages: ``xs, xb = x.split(...)``, ``xb`` feeding the blocks and their residual
    additions), the offsets are wrong and so are the channel indices of whole groups. Here each
    consumer's output number is read from its autograd inputs.
    """
    tp = _tp()
    mapping = tp.dependency.index_mapping
    offsets = split_offsets(split_node.grad_fn)
    outputs = [split_output(split_node, n) for n in split_node.outputs]
    if split_node.type != tp.ops.OPTYPE.SPLIT or offsets is None or None in outputs \
            or not split_node.enable_index_mapping:
        return ORIGINAL["split"](graph, split_node)
    fn = split_node.grad_fn
    dim, sizes = getattr(fn, "_saved_dim", 1), getattr(fn, "_saved_self_sym_sizes", None)
    if sizes is not None and dim < len(sizes) and dim != 1:
        return None   # a split along another dimension: channels pass through unchanged
    for out_node, k in zip(split_node.outputs, outputs):
        for dep in split_node.dependencies:
            if dep.target == out_node:
                dep.index_mapping[0] = mapping._SplitIndexMapping(offset=offsets[k: k + 2], reverse=False)
        for dep in out_node.dependencies:
            if dep.target == split_node:
                dep.index_mapping[0] = mapping._SplitIndexMapping(offset=offsets[k: k + 2], reverse=True)
    return None


def split_can_shrink(fn, idxs: list[int]) -> bool:
    """Whether removing channels ``idxs`` (of a split's input) leaves the split valid: ``x.split(n)`` takes
    the same first parts from a narrower tensor, so only channels of its last part can go; a list of
    sizes fixes every part."""
    offsets = split_offsets(fn)
    if offsets is None or hasattr(fn, "_saved_split_sizes"):
        return offsets is None   # not a split we can read: leave it to the extraction's check
    return all(i >= offsets[-2] for i in idxs)


def split_offsets(fn) -> list[int] | None:
    """The channel offsets of a split's outputs, from its autograd node (Torch-Pruning's own count them by
    consumers: ``[0, 2048, 3072, 4096]`` for a 2048-channel tensor split in two, read three times)."""
    sizes, dim = getattr(fn, "_saved_self_sym_sizes", None), getattr(fn, "_saved_dim", None)
    if sizes is None or dim is None or not 0 <= dim < len(sizes):
        return None
    total = int(sizes[dim])
    if hasattr(fn, "_saved_split_sizes"):
        parts = [int(v) for v in fn._saved_split_sizes]
    elif hasattr(fn, "_saved_split_size") and int(fn._saved_split_size) > 0:
        step = int(fn._saved_split_size)
        parts = [min(step, total - start) for start in range(0, total, step)]
    else:
        return None
    offsets = [0]
    for part in parts:
        offsets.append(offsets[-1] + part)
    return offsets


def cat_position(cat_fn, in_node) -> int | None:
    """Which argument of a torch.cat ``in_node`` is, from the autograd graph (None: not found or twice)."""
    found = [k for k, (next_fn, _) in enumerate(cat_fn.next_functions) if next_fn is in_node.grad_fn]
    return found[0] if len(found) == 1 else None


def update_concat_index_mapping(graph, cat_node) -> None:
    """Torch-Pruning's concat index mapping, with the offsets laid out in the order of torch.cat's arguments.

    Torch-Pruning lays the inputs out in the order it found them, which is not always the argument order
    (ghost modules, ``torch.cat([x1, cheap(x1)])``, where ``x1`` is reached through ``cheap`` first); the
    channels of the two inputs then trade places in every group through the concatenation.
    """
    tp = _tp()
    mapping, shape_infer = tp.dependency.index_mapping, tp.dependency.shape_infer
    fn = cat_node.grad_fn
    positions = [cat_position(fn, n) for n in cat_node.inputs]
    if cat_node.type != tp.ops.OPTYPE.CONCAT or not cat_node.enable_index_mapping or None in positions \
            or len(set(positions)) != len(positions):
        return ORIGINAL["concat"](graph, cat_node)
    if getattr(fn, "_saved_dim", 1) != 1 and fn._saved_dim < tp.dependency.constants.MAX_VALID_DIM:
        return None
    chs = [shape_infer.infer_channels_between(graph, n, cat_node) for n in cat_node.inputs]
    out_size = shape_infer.infer_in_channels_recursively(graph, cat_node, recursive_depth=[0])
    if None in chs or (out_size is not None and out_size != sum(chs)):
        return ORIGINAL["concat"](graph, cat_node)
    order = sorted(range(len(chs)), key=lambda i: positions[i])
    start, span = 0, {}
    for i in order:
        span[i] = [start, start + chs[i]]
        start += chs[i]
    cat_node.module.concat_sizes = [chs[i] for i in order]
    cat_node.module.offsets = [0] + [span[i][1] for i in order]
    for i, in_node in enumerate(cat_node.inputs):
        for dep in cat_node.dependencies:
            if dep.target == in_node:
                dep.index_mapping[1] = mapping._ConcatIndexMapping(offset=span[i], reverse=True)
        for dep in in_node.dependencies:
            if dep.target == cat_node:
                dep.index_mapping[1] = mapping._ConcatIndexMapping(offset=span[i], reverse=False)
    return None
