"""The channel spec of an extracted model, and saving and loading a pruned model by it.

* :func:`build_spec` writes the spec (format, versions, input shapes and dtypes, each group's kept
  channels, each block's state, the state-dict shapes); :func:`spec_digest` is its self-digest
  (field ``sha256``: SHA-256 of ``json.dumps`` of the other fields with ``sort_keys=True``).
* :func:`_check_spec` is its schema (types, ranges, an allow-list of dtypes, at most
  ``MAX_INPUT_ELEMENTS`` elements per traced input), checked before anything in a spec is used.
* :func:`save_pruned` / :func:`load_pruned`: a human-readable JSON spec plus a ``state_dict``
  (``weights.pt`` with its ``weights.pt.sha256``); loading rebuilds from the user's own model
  class and reads the weights with ``torch.load(weights_only=True)``; both digests are verified.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from .._io import IntegrityError, load_tensors, save_tensors, write_text
from ..ops.common import is_number
from .blocks import close_blocks
from .inputs import INPUT_DTYPES, MAX_INPUT_ELEMENTS, check_fits, check_model_arg, model_device, random_inputs
from .tp import remove_channels

if TYPE_CHECKING:
    from .attach import SurgeryRecord

SPEC_FORMAT = 1
SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.pt"
MAX_INPUTS = 16                   # inputs a spec may list
MAX_SPEC_BYTES = 64 * 2 ** 20     # size of a spec.json that load_pruned reads
MAX_SPEC_DEPTH = 16               # nesting of a spec.json (its deepest field, preprocessing, is 4 levels)


def _spec_input_shapes(shapes: list[list[int]]) -> list[list[int]]:
    """The input shapes a spec records: the example's, with the batch made smaller where an input has more
    than MAX_INPUT_ELEMENTS elements (load_pruned traces the model on inputs of these shapes)."""
    shapes = [[int(d) for d in s] for s in shapes]
    for s in shapes:
        if math.prod(s[1:]) > MAX_INPUT_ELEMENTS:
            raise ValueError(f"example_inputs: one sample of shape {s[1:]} has {math.prod(s[1:])} elements, more than "
                             f"a saved model is traced with when it loads ({MAX_INPUT_ELEMENTS}); prune with a smaller "
                             "example input (the channels removed do not depend on its size)")
    if all(math.prod(s) <= MAX_INPUT_ELEMENTS for s in shapes):
        return shapes
    batch = min(MAX_INPUT_ELEMENTS // max(1, math.prod(s[1:])) for s in shapes)
    return [[max(1, min(s[0], batch)), *s[1:]] for s in shapes]


def build_spec(model: nn.Module, record: "SurgeryRecord", groups: list[dict], blocks: list[dict]) -> dict:
    from .._version import __version__

    return {
        "format": SPEC_FORMAT,
        "library": "polarprune_cuda",
        "version": __version__,
        "torch": torch.__version__,
        "input_shapes": _spec_input_shapes(record.input_shapes),
        "input_dtypes": record.input_dtypes,
        "groups": groups,
        "blocks": blocks,
        "removed_blocks": [b["name"] for b in blocks if b["closed"]],
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
    }


def spec_digest(spec: dict) -> str:
    """SHA-256 of ``json.dumps(spec without its 'sha256' field, sort_keys=True)``: the spec's self-digest."""
    body = {k: v for k, v in spec.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


# --- the spec's schema: checked before anything in it is used

SPEC_FIELDS = ("format", "library", "version", "torch", "input_shapes", "input_dtypes", "groups", "blocks",
               "removed_blocks", "shapes")
GROUP_FIELDS = ("name", "root", "channels", "repeat", "kept")
#: optional: what an input needs before the model sees it (save_pruned's ``preprocessing``)
PREPROCESSING_FIELDS = ("mean", "std", "image_size", "channels", "classes")
BLOCK_FIELDS = ("name", "closed", "shortcut", "act", "depth_saved")
MAX_INPUT_DIMS = 8
# a dotted module path: any characters but dots and white space between the dots (nn.Module allows '-' and
# more in child names: torchvision's RegNet has 'block1-0'); it is only ever looked up with get_submodule
_NAME = re.compile(r"[^.\s]+(\.[^.\s]+)*")
_ATTR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, (set, tuple)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Schema:
    """Field checks that raise ValueError naming the file and the field (e.g. ``groups[3].kept``)."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, expected: str, value=None, show: bool = True):
        got = f", got {_show(value)}" if show else ""
        raise ValueError(f"{self.where}: field '{field}' must be {expected}{got}")

    def fields(self, obj, field: str, required, optional=()) -> dict:
        if not isinstance(obj, dict):
            self.fail(field or "(top level)", "a JSON object", obj)
        prefix = f"{field}." if field else ""
        for key in required:
            if key not in obj:
                raise ValueError(f"{self.where}: field '{prefix}{key}' is missing (required: {', '.join(required)})")
        extra = [k for k in obj if k not in required and k not in optional]
        if extra:
            raise ValueError(f"{self.where}: unknown field '{prefix}{extra[0]}' (fields: "
                             f"{', '.join((*required, *optional))})")
        return obj

    def int_(self, value, field: str, low: int, high: int | None = None) -> int:
        if type(value) is not int or value < low or (high is not None and value > high):
            rng = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
            self.fail(field, rng, value)
        return value

    def str_(self, value, field: str, pattern: re.Pattern | None = None, what: str = "a string") -> str:
        if not isinstance(value, str) or len(value) > 1000 or (pattern is not None and not pattern.fullmatch(value)):
            self.fail(field, what, value)
        return value

    def list_(self, value, field: str, low: int = 0, high: int | None = None) -> list:
        if not isinstance(value, list) or len(value) < low or (high is not None and len(value) > high):
            n = f" of {low} to {high} entries" if high is not None else (f" of at least {low} entries" if low else "")
            self.fail(field, f"a list{n}", value)
        return value


def _check_inputs(s: _Schema, spec: dict) -> None:
    shapes_in = s.list_(spec["input_shapes"], "input_shapes", 1, MAX_INPUTS)
    for i, shape in enumerate(shapes_in):
        s.list_(shape, f"input_shapes[{i}]", 1, MAX_INPUT_DIMS)
        for j, d in enumerate(shape):
            s.int_(d, f"input_shapes[{i}][{j}]", 1, MAX_INPUT_ELEMENTS)
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            s.fail(f"input_shapes[{i}]", f"a shape of at most {MAX_INPUT_ELEMENTS} elements (load_pruned "
                   f"allocates an input of that shape), got {shape} ({math.prod(shape)} elements)", show=False)
    dtypes = s.list_(spec["input_dtypes"], "input_dtypes", len(shapes_in), len(shapes_in))
    for i, d in enumerate(dtypes):
        if not isinstance(d, str) or d not in INPUT_DTYPES:
            s.fail(f"input_dtypes[{i}]", f"one of {', '.join(INPUT_DTYPES)}", d)


def _check_blocks(s: _Schema, spec: dict) -> dict[str, bool]:
    """Check 'blocks' and 'removed_blocks'; returns block name -> closed."""
    seen_blocks: dict[str, bool] = {}
    for i, b in enumerate(s.list_(spec["blocks"], "blocks")):
        f = f"blocks[{i}]"
        s.fields(b, f, BLOCK_FIELDS)
        name = s.str_(b["name"], f"{f}.name", _NAME, "a module name such as 'layer1.0'")
        if name in seen_blocks:
            s.fail(f"{f}.name", "a block not listed before", name)
        if not isinstance(b["closed"], bool):
            s.fail(f"{f}.closed", "true or false", b["closed"])
        for key in ("shortcut", "act"):
            if b[key] is not None:
                s.str_(b[key], f"{f}.{key}", _ATTR, "null or an attribute name")
        s.int_(b["depth_saved"], f"{f}.depth_saved", 0)
        seen_blocks[name] = b["closed"]
    removed = s.list_(spec["removed_blocks"], "removed_blocks")
    closed = [n for n, c in seen_blocks.items() if c]
    if removed != closed:
        s.fail("removed_blocks", f"the names of the closed blocks, {_show(closed)}", removed)
    return seen_blocks


def _check_group(s: _Schema, g, f: str, seen_blocks: dict[str, bool]) -> None:
    """Check one entry ``f`` (e.g. ``groups[3]``) of 'groups'."""
    s.fields(g, f, GROUP_FIELDS, ("removed_with",))
    s.str_(g["name"], f"{f}.name")
    s.str_(g["root"], f"{f}.root", _NAME, "a module name such as 'layer1.0.conv1'")
    channels = s.int_(g["channels"], f"{f}.channels", 1)
    repeat = s.int_(g["repeat"], f"{f}.repeat", 1, channels)
    if channels % repeat:
        s.fail(f"{f}.repeat", f"a divisor of channels ({channels})", repeat)
    kept = s.list_(g["kept"], f"{f}.kept")
    if "removed_with" in g:
        owner = g["removed_with"]
        if not isinstance(owner, str) or not seen_blocks.get(owner, False):
            s.fail(f"{f}.removed_with", "the name of a closed block of 'blocks'", owner)
        if kept:
            s.fail(f"{f}.kept", "empty for a group removed with its block", kept)
        return
    if not kept:
        s.fail(f"{f}.kept", "a non-empty list of channel indices (a group keeps a channel unless it has "
               "'removed_with')", kept)
    previous = -1
    for j, k in enumerate(kept):
        s.int_(k, f"{f}.kept[{j}]", 0, channels - 1)
        if k <= previous:
            s.fail(f"{f}.kept", "sorted channel indices without repeats", kept)
        previous = k
    size = channels // repeat
    base = [k for k in kept if k < size]
    # the length first: the expected list is built only when it is as long as 'kept' (a 7 KB spec declaring
    # repeat = 2**32 must not build a list of 2**32 entries)
    if repeat > 1 and (len(kept) != len(base) * repeat
                       or kept != [k + r * size for r in range(repeat) for k in base]):
        s.fail(f"{f}.kept", f"the same channels in each of its {repeat} groups of {size}", kept)


def _check_preprocessing(s: "_Schema", prep) -> None:
    s.fields(prep, "preprocessing", PREPROCESSING_FIELDS)
    channels = s.int_(prep["channels"], "preprocessing.channels", 1, 4096)
    s.int_(prep["image_size"], "preprocessing.image_size", 1, 1_000_000)
    for key in ("mean", "std"):
        for j, v in enumerate(s.list_(prep[key], f"preprocessing.{key}", channels, channels)):
            if not is_number(v) or (key == "std" and v <= 0):
                s.fail(f"preprocessing.{key}[{j}]", "a finite number" + (" > 0" if key == "std" else ""), v)
    for j, c in enumerate(s.list_(prep["classes"], "preprocessing.classes", 0, 1_000_000)):
        s.str_(c, f"preprocessing.classes[{j}]")


def _check_spec(spec, where: str) -> dict:
    """Validate a parsed channel spec (without its 'sha256' field); ValueError naming the field."""
    s = _Schema(where)
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must hold a JSON object (a polarprune_cuda channel spec), got a JSON "
                         f"{'array' if isinstance(spec, list) else type(spec).__name__}")
    s.fields(spec, "", SPEC_FIELDS, optional=("preprocessing",))
    if "preprocessing" in spec:
        _check_preprocessing(s, spec["preprocessing"])
    if spec["library"] != "polarprune_cuda" or type(spec["format"]) is not int or spec["format"] != SPEC_FORMAT:
        raise ValueError(f"{where} is not a polarprune_cuda channel spec of format {SPEC_FORMAT} (fields 'library' "
                         f"{_show(spec['library'])}, 'format' {_show(spec['format'])})")
    s.str_(spec["version"], "version")
    s.str_(spec["torch"], "torch")
    _check_inputs(s, spec)
    seen_blocks = _check_blocks(s, spec)
    for i, g in enumerate(s.list_(spec["groups"], "groups")):
        _check_group(s, g, f"groups[{i}]", seen_blocks)
    shapes = spec["shapes"]
    if not isinstance(shapes, dict):
        s.fail("shapes", "a JSON object of state_dict key -> shape", shapes)
    for key, shape in shapes.items():
        s.list_(shape, f"shapes.{key}")
        for j, d in enumerate(shape):
            s.int_(d, f"shapes.{key}[{j}]", 0)
    return spec


def _with_metadata(state: dict, weights_file) -> OrderedDict:
    """``state`` as the OrderedDict ``load_state_dict`` takes, with its module versions (``_metadata``) when
    they are well formed: prefix -> {"version": int}; anything else in them is refused by name."""
    metadata = getattr(state, "_metadata", None)
    out = OrderedDict(state)
    if metadata is None:
        return out
    if not isinstance(metadata, dict) or len(metadata) > 100_000:
        raise ValueError(f"{weights_file}: the state_dict's _metadata must be a dict of module prefix -> "
                         f"{{'version': int}}, got {type(metadata).__name__}")
    clean = OrderedDict()
    for prefix, entry in metadata.items():
        if not isinstance(prefix, str) or not isinstance(entry, dict) or not all(
                isinstance(k, str) and (v is None or (isinstance(v, int) and not isinstance(v, bool)))
                for k, v in entry.items()):
            raise ValueError(f"{weights_file}: the state_dict's _metadata entry {prefix!r} must be a dict of "
                             f"str -> int (a module version), got {entry!r}")
        clean[prefix] = dict(entry)
    out._metadata = clean
    return out


def save_pruned(model: nn.Module, path, preprocessing: dict | None = None) -> Path:
    """Write ``path/spec.json`` (human-readable channel spec with its own ``sha256`` field), ``path/weights.pt``
    (state_dict) and ``path/weights.pt.sha256`` (its digest, ``sha256sum -c`` format). ``preprocessing``: what an
    input needs before the model sees it (``mean``, ``std`` per channel of values in [0, 1], ``image_size``,
    ``channels``, ``classes``), kept in the spec; :func:`load_pruned` gives it back in ``polarprune_spec``."""
    check_model_arg(model)
    spec = getattr(model, "polarprune_spec", None)
    if not isinstance(spec, dict):
        raise ValueError("model has no channel spec: save the model returned by pp.extract")
    spec = json.loads(json.dumps({k: v for k, v in spec.items() if k != "sha256"}))   # plain JSON values
    if preprocessing is not None:
        spec["preprocessing"] = json.loads(json.dumps(preprocessing))
    _check_spec(spec, "model.polarprune_spec")   # never write a spec that load_pruned refuses
    spec["sha256"] = spec_digest(spec)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    source = model.state_dict()
    state = OrderedDict((k, v.detach().cpu()) for k, v in source.items())
    metadata = getattr(source, "_metadata", None)
    if metadata is not None:   # module versions, which some classes read when loading (MNASNet, BatchNorm)
        state._metadata = metadata
    save_tensors(state, path / WEIGHTS_FILE)
    write_text(path / SPEC_FILE, json.dumps(spec, indent=1))
    return path


def _depth(obj) -> int:
    """How deeply JSON data nests (without recursion: a file may nest thousands of levels)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def _read_spec(spec_file: Path, verify: bool) -> dict:
    """The parsed, digest-checked (with ``verify``) and schema-checked spec, without its 'sha256' field."""
    size = spec_file.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise ValueError(f"{spec_file} has {size} bytes, more than a channel spec has ({MAX_SPEC_BYTES} at most)")
    try:
        spec = json.loads(spec_file.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{spec_file} is not valid JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(spec, dict):
        _check_spec(spec, str(spec_file))   # raises: not a JSON object
    if _depth(spec) > MAX_SPEC_DEPTH:
        raise ValueError(f"{spec_file} is nested more than {MAX_SPEC_DEPTH} levels deep; a channel spec is not")
    if verify:
        recorded = spec.get("sha256")
        if recorded is None:
            raise IntegrityError(f"{spec_file} has no 'sha256' field, so its contents cannot be verified (it was "
                                 "written by an older polarprune_cuda, or edited); pass verify=False to load it "
                                 "anyway")
        if not isinstance(recorded, str) or recorded != spec_digest(spec):
            raise IntegrityError(f"{spec_file} was changed or damaged after it was written (its contents do not "
                                 "match its 'sha256' field); restore it or save the model again, or pass "
                                 "verify=False to skip the check")
    spec.pop("sha256", None)
    return _check_spec(spec, str(spec_file))


def _check_factory(factory) -> None:
    if isinstance(factory, nn.Module):
        raise TypeError(f"factory must be a callable that returns a new dense model, e.g. lambda: MyNet(), not a "
                        f"model instance (got a {type(factory).__name__} instance)")
    if not callable(factory):
        raise TypeError(f"factory must be a callable that returns the dense model, e.g. lambda: MyNet(); got "
                        f"{type(factory).__name__}")


def _check_roots(model: nn.Module, spec: dict) -> None:
    """Every kept group's root is a module of ``model`` with the spec's number of output channels."""
    for group in spec["groups"]:
        if "removed_with" in group:
            continue
        try:
            root = model.get_submodule(group["root"])
        except Exception:
            raise ValueError(f"spec does not match the model: module {group['root']!r} of the spec is not in the "
                             "model") from None
        weight = getattr(root, "weight", None)
        channels = weight.shape[0] if isinstance(weight, Tensor) and weight.dim() > 0 else None
        if channels != group["channels"]:
            raise ValueError(f"spec does not match the model: module {group['root']!r} has {channels} output "
                             f"channels, the spec says {group['channels']}")


def _check_shapes(model: nn.Module, spec: dict) -> None:
    """The state-dict keys and shapes of ``model`` are the spec's 'shapes'."""
    state_shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    for key, shape in state_shapes.items():      # in the model's own order
        module = key.rpartition(".")[0] or key
        if key not in spec["shapes"]:
            raise ValueError(f"spec does not match the model: {module!r} has {key!r}, which the spec does not list")
        if spec["shapes"][key] != shape:
            raise ValueError(f"spec does not match the model: {module!r} has {key} of shape {shape}, "
                             f"the spec says {spec['shapes'][key]}")
    missing = [k for k in spec["shapes"] if k not in state_shapes]
    if missing:
        raise ValueError(f"spec does not match the model: {missing[0].rpartition('.')[0]!r} of the spec is "
                         f"not in the model (no {missing[0]!r})")


def _rebuild(model: nn.Module, spec: dict) -> None:
    """Apply a schema-checked spec to the dense ``model`` in place; ValueError 'spec does not match the model'."""
    device = model_device(model)
    close_blocks(model, spec["blocks"], strict=True)
    _check_roots(model, spec)
    inputs = random_inputs(spec["input_shapes"], spec["input_dtypes"], device)
    try:
        dense_outputs = check_fits(model, inputs)
    except ValueError as exc:
        raise ValueError(f"spec does not match the model: it cannot run on inputs of the spec's input_shapes "
                         f"{spec['input_shapes']} and input_dtypes {spec['input_dtypes']} "
                         f"({exc.__cause__.__class__.__name__}: {exc.__cause__})") from exc
    try:
        remove_channels(model, spec["groups"], inputs)
    except Exception as exc:
        raise ValueError(f"spec does not match the model: removing the spec's channels failed "
                         f"({type(exc).__name__}: {exc})") from exc
    _check_shapes(model, spec)
    try:
        outputs = check_fits(model, inputs)
    except ValueError as exc:
        raise ValueError(f"spec does not match the model: the model with the spec's channels removed cannot run "
                         f"({exc.__cause__.__class__.__name__}: {exc.__cause__})") from exc
    if outputs != dense_outputs:
        raise ValueError(f"spec does not match the model: it changes the model's outputs from {dense_outputs} to "
                         f"{outputs}; pruning keeps a model's outputs (does the spec remove classifier outputs?)")


def _check_values(state: dict, weights_file) -> None:
    """Weights a model can hold: real (a complex tensor would lose its imaginary part in ``load_state_dict``),
    finite, and BatchNorm running variances not negative (export and inference would produce NaN)."""
    for key, t in state.items():
        if t.is_complex():
            raise ValueError(f"{weights_file}: {key!r} is {str(t.dtype).replace('torch.', '')}; a model's weights "
                             "are real")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{weights_file}: {key!r} holds NaN or inf; the weights are not usable")
        if key.endswith("running_var") and t.is_floating_point() and bool((t < 0).any()):
            raise ValueError(f"{weights_file}: {key!r} holds negative values; a running variance never is")


def load_pruned(path, factory: Callable[[], nn.Module], map_location="cpu", verify: bool = True) -> nn.Module:
    """Rebuild a pruned model: ``factory()`` makes the user's dense model, the spec prunes it, weights load.

    ``factory`` is a callable that returns a new dense model (``lambda: MyNet()``), not a model. The spec is
    checked against its ``sha256`` field and a schema, the weights against ``weights.pt.sha256``, before
    anything in them is used, and the weights load with ``torch.load(weights_only=True)``. ``verify=False``
    skips both digests (files written elsewhere or by an older version); the schema and the shape checks
    stay. Raises :class:`~polarprune_cuda._io.IntegrityError` (a ValueError naming the file) for a changed
    file, ValueError naming the field for a malformed spec, and ValueError naming the first module that does
    not match the spec.
    """
    path = Path(path)
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True or False, got {verify!r}")
    spec_file, weights_file = path / SPEC_FILE, path / WEIGHTS_FILE
    for f in (spec_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: path must be a folder written by save_pruned")
    _check_factory(factory)
    spec = _read_spec(spec_file, verify)
    state = load_tensors(weights_file, map_location=map_location, verify=verify)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{weights_file} does not hold a state_dict (a dict of names to tensors)")
    for key, shape in spec["shapes"].items():
        if key not in state or list(state[key].shape) != shape:
            got = "no such entry" if key not in state else f"shape {list(state[key].shape)}"
            raise ValueError(f"{weights_file} does not match {spec_file.name}: the spec lists {key!r} of shape "
                             f"{shape}, the weights have {got}")
    extra = [k for k in state if k not in spec["shapes"]]
    if extra:
        raise ValueError(f"{weights_file} does not match {spec_file.name}: {extra[0]!r} is not in the spec")
    _check_values(state, weights_file)
    state = _with_metadata(state, weights_file)
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"factory must return an nn.Module (the dense model), got {type(model).__name__}")
    _rebuild(model, spec)
    model.load_state_dict(state)   # keys and shapes equal the model's: checked above
    model.polarprune_spec = spec
    return model


