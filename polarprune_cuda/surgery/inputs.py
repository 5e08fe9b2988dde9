"""Example inputs and running a model on them, the one place surgery/ (blocks.py included) does it.

* :func:`as_inputs`: ``example_inputs`` normalised and checked (a tuple of
  finite, non-empty tensors of an allowed dtype); :func:`tensor_tuple` is its
  structural part.
* :func:`random_inputs`: the seeded stand-in batch of recorded shapes and dtypes.
* :func:`eval_mode`: run a body with models in eval mode, their training mode restored.
* :func:`run_on` / :func:`check_fits`: one forward pass, a failure naming example_inputs.
* :func:`flatten_outputs`: the tensors of a model output (tensor, tuple, list, dict, nested).
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..gates.bank import find_bank

# dtypes an input may have (the spec names them by these strings; nothing else is looked up on torch)
INPUT_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "complex64": torch.complex64, "complex128": torch.complex128, "int8": torch.int8, "int16": torch.int16,
    "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool,
}
#: elements of one input that load_pruned allocates to trace the model, and that export traces with: 4M (a
#: 3 x 1182 x 1182 image); the activations of a CNN on it stay within a few hundred MB
MAX_INPUT_ELEMENTS = 2 ** 22


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_model_arg(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def score_ids(model: nn.Module) -> set[int]:
    """ids of the gate scores of ``model``'s bank (empty without one): they are not weights of the model."""
    bank = find_bank(model)
    return {id(bank.scores)} if bank is not None else set()


def index_probe(model: nn.Module) -> tuple[nn.Module, set[int]]:
    """A float64 copy of ``model`` whose every floating parameter and buffer (gate scores aside) holds its own
    flat index plus one, and the ids of the copy's scores. Channel removal only selects elements, so what a
    removal run on the probe leaves are indices (:func:`index_maps_of` reads them back)."""
    probe = copy.deepcopy(model).double()
    skip = score_ids(probe)
    with torch.no_grad():
        for t in [*probe.parameters(), *probe.buffers()]:
            if t.is_floating_point() and id(t) not in skip:
                if t.numel() >= 2 ** 53:
                    raise ValueError(f"a tensor of {t.numel()} elements is too large to map")
                t.copy_(torch.arange(1, t.numel() + 1, dtype=torch.float64, device=t.device).view(t.shape))
    return probe, skip


def index_maps_of(module: nn.Module, what: str, exclude: frozenset | set = frozenset()) -> dict[str, Tensor]:
    """Per floating state-dict entry of ``module`` (a probe after ``what`` ran on it; names in ``exclude``
    aside), the flat indices its elements came from, -1 where a zero was written."""
    maps = {}
    for name, t in module.state_dict().items():
        if t.is_floating_point() and name not in exclude:
            idx = t.detach().round().long() - 1
            if not bool(((idx >= -1) & (t == idx + 1)).all()):
                raise UnsupportedModelError(f"{what} does not only select elements of {name!r}: its "
                                            "per-element training state cannot follow it")
            maps[name] = idx
    return maps


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def tensor_tuple(example_inputs) -> tuple[Tensor, ...] | None:
    """``example_inputs`` (a tensor, or a non-empty tuple or list of tensors) as a tuple; None for anything else."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(isinstance(t, Tensor)
                                                                            for t in example_inputs):
        return tuple(example_inputs)
    return None


def as_inputs(example_inputs) -> tuple[Tensor, ...]:
    """``example_inputs`` as a tuple of tensors, each non-empty (batch >= 1), of a supported dtype, finite."""
    inputs = tensor_tuple(example_inputs)
    if inputs is None:
        raise TypeError("example_inputs must be a tensor (or a tuple of tensors) shaped like one batch of model "
                        f"input, e.g. torch.randn(1, 3, 224, 224); got {type(example_inputs).__name__}")
    for t in inputs:
        if t.dim() == 0 or t.numel() == 0:
            raise ValueError(f"example_inputs must be one batch of at least one sample, e.g. torch.randn(1, 3, 224, "
                             f"224); got a tensor of shape {tuple(t.shape)}")
        if dtype_name(t.dtype) not in INPUT_DTYPES:
            raise ValueError(f"example_inputs have dtype {t.dtype}, which is not supported; use one of "
                             f"{', '.join(INPUT_DTYPES)}")
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"example_inputs hold NaN or inf (a tensor of shape {tuple(t.shape)})")
    return inputs


def random_inputs(shapes: list[list[int]], dtypes: list[str], device) -> tuple[Tensor, ...]:
    """A seeded batch of the recorded input ``shapes`` and ``dtypes`` (floating: randn; others: zeros)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for shape, dtype in zip(shapes, dtypes):
        dt = INPUT_DTYPES.get(dtype) if isinstance(dtype, str) else None
        if dt is None:
            raise ValueError(f"input_dtypes: {dtype!r} is not one of {', '.join(INPUT_DTYPES)}")
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise ValueError(f"input_shapes: {shape} has more than {MAX_INPUT_ELEMENTS} elements")
        if dt.is_floating_point or dt.is_complex:
            out.append(torch.randn(*shape, generator=gen).to(device=device, dtype=dt))
        else:
            out.append(torch.zeros(*shape, dtype=dt, device=device))
    return tuple(out)


@contextmanager
def eval_mode(*models: nn.Module, switch: bool = True) -> Iterator[None]:
    """Run the body with ``models`` in eval mode (``switch=False``: in the mode they are in); each model's
    training mode is restored afterwards, also when the body raises."""
    modes = [m.training for m in models]
    try:
        if switch:
            for m in models:
                m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _first_weight(model: nn.Module) -> Tensor | None:
    for t in model.parameters():
        if t.is_floating_point():
            return t
    return None


def check_placement(model: nn.Module, inputs) -> None:
    """ValueError when example_inputs are on another device than the model's parameters, or (floating) of
    another dtype: checked before anything runs the model."""
    weight = _first_weight(model)
    if weight is None:
        return
    for t in inputs:
        if t.device != weight.device:
            raise ValueError(f"example_inputs are on {t.device} but the model's parameters are on {weight.device}; "
                             f"pass example_inputs.to({str(weight.device)!r})")
        if t.is_floating_point() and t.dtype != weight.dtype:
            raise ValueError(f"example_inputs have dtype {dtype_name(t.dtype)} but the model's parameters "
                             f"{dtype_name(weight.dtype)}; pass example_inputs.to(torch.{dtype_name(weight.dtype)})")


def _first_layer(model: nn.Module, inputs) -> nn.Module | None:
    """The first Conv2d or Linear the forward pass calls on ``inputs`` (recorded by pre-hooks, even when the
    pass then fails), else None."""
    called: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: called.append(m) if not called else None)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    except Exception:
        pass
    finally:
        for h in hooks:
            h.remove()
    return called[0] if called else None


def _diagnose(model: nn.Module, inputs) -> str | None:
    """What is wrong with the shape of example_inputs for the model's first layer, in words, or None."""
    layer = _first_layer(model, inputs)
    x = inputs[0]
    names = {m: n for n, m in model.named_modules()}
    if isinstance(layer, nn.Conv2d):
        want = f"(N, {layer.in_channels}, H, W)"
        if x.dim() != 4:
            return f"example_inputs must have shape {want}, got {tuple(x.shape)} ({x.dim()} dimensions)"
        if x.shape[1] != layer.in_channels:
            return (f"example_inputs have {x.shape[1]} channels but the model's first convolution "
                    f"{names.get(layer, '?')!r} takes {layer.in_channels}: shape {want}, got {tuple(x.shape)}")
        return None
    if isinstance(layer, nn.Linear) and x.shape[-1] != layer.in_features and x.dim() == 2:
        return (f"example_inputs have {x.shape[-1]} features but the model's first layer {names.get(layer, '?')!r} "
                f"takes {layer.in_features}: shape (N, {layer.in_features}), got {tuple(x.shape)}")
    return None


def run_on(model: nn.Module, inputs):
    """``model(*inputs)``; any error of the user's forward becomes ValueError naming example_inputs (and, where
    it can tell, the shape the model's first layer wants)."""
    try:
        return model(*inputs)
    except Exception as exc:
        shapes = ", ".join(f"{tuple(t.shape)} {dtype_name(t.dtype)}" for t in inputs)
        diagnosis = _diagnose(model, inputs)
        if diagnosis is not None:
            raise ValueError(diagnosis) from exc
        raise ValueError(f"example_inputs do not fit the model: {type(exc).__name__}: {exc} (example_inputs: "
                         f"{shapes})") from exc


def run_hooked(model: nn.Module, inputs, modules, hook, pre: bool = False) -> None:
    """Run ``model`` once on ``inputs`` in eval mode without gradients, with ``hook`` a forward hook (``pre``: a
    forward pre-hook) of each of ``modules``; the hooks are removed and the training mode restored after."""
    handles = [m.register_forward_pre_hook(hook) if pre else m.register_forward_hook(hook) for m in modules]
    try:
        with eval_mode(model), torch.no_grad():
            run_on(model, inputs)
    finally:
        for h in handles:
            h.remove()


def check_fits(model: nn.Module, inputs) -> list[tuple[int, ...]]:
    """Run ``model`` once in eval mode on ``inputs`` (ValueError if it cannot); training mode is restored.
    Returns the shapes of the output's tensors."""
    with eval_mode(model), torch.no_grad():
        return [tuple(t.shape) for t in flatten_outputs(run_on(model, inputs))]


def flatten_outputs(out) -> list[Tensor]:
    """The tensors of a model output, in order: a tensor, or tuples, lists and dicts of them (nested);
    anything else holds none."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    return []
