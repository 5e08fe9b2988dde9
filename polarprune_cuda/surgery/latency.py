"""Latency as a cost: each layer's time measured over kept widths on the user's device, read by the budget as
a lookup table and fitted for the penalty.

:func:`latency_cost` times every Conv2d, Linear and BatchNorm2d of a gated model on its own (a fresh layer of
the kept widths, the input it sees in the model, the example batch, device and dtype) over kept input and
output widths: with ``round_to`` (from :func:`~polarprune_cuda.attach_gates`), every multiple of it where a side
has at most LATTICE_POINTS of them, so each width the budget can choose is a measured entry; otherwise (and
where the time bound asks) a grid of fractions. Two models are registered on the gate bank as ``latency``
(ms per batch):

* the budget's (:class:`LookupCost`, ``GateBank.set_cost(exact=)``): each layer's table read at its kept widths
  (bilinear between entries), so :func:`~polarprune_cuda.meet_target`, ``hard_cost`` and the report's
  prediction follow the device's steps (a convolution's time jumps between widths on oneDNN);
* the penalty's (a :class:`~polarprune_cuda.ops.cost.CostModel`): each table fitted by
  ``a + b * c_in + c * c_out + d * c_in * c_out`` (``b, c, d >= 0``), the form of the exact MACs model, so
  ``PolarizationLoss(cost="latency")`` and its kernels take it as they take MACs.

Layers timed alone run faster than inside the network (their input stays in cache), and the network does more
than its layers (activations, additions, pooling, the framework's calls): the dense network, extracted, is timed
whole, and what it takes beyond its layers' sum is charged per element the layers read (:func:`compose`; a
network faster than its layers' sum is scaled down instead). Tried and replaced (docs/results.md, latency as the
cost): the dense network's ratio as one scale for every layer; a line through uniform 100/75/50/25% networks;
each layer timed inside uniform networks.

Tables and the dense network's time are cached in a JSON file (``cache``; default ``$POLARPRUNE_CACHE_DIR/latency.json``, else
``~/.cache/polarprune_cuda/latency.json``) under a key naming the layer (type, widths, kernel, stride, padding,
groups, bias, input size, the round_to lattice), the device (CPU model or GPU name), the thread count, the
dtype, the batch and the torch version: a table measured anywhere else is not reused. The file is rewritten
atomically after every layer, so an interrupted build keeps what it measured.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._io import write_text
from ..gates.bank import find_bank
from .costs import Site, fitted_cost_model, is_depthwise, per_channel, sites_of, widths
from .extract import extract
from .inputs import as_inputs, eval_mode, run_hooked, run_on

CACHE_FORMAT = 2   # 2: the calibration's layers' sum is the tables' (it was the fit's)
#: kept-width fractions of a layer's channels the tables are measured at (fewer where the time bound asks)
GRID = (0.125, 0.25, 0.5, 0.75, 1.0)
#: with round_to, a side of at most this many multiples of it is measured at every one (the lookup is then exact)
LATTICE_POINTS = 8
#: each timing repeats the call until this much time has passed (and at least MIN_REPEATS times)
MIN_SECONDS = 0.01
MIN_REPEATS = 5
MAX_REPEATS = 200


def default_cache() -> Path:
    root = os.environ.get("POLARPRUNE_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "polarprune_cuda") / "latency.json"


def device_name(device: torch.device) -> str:
    """What the tables' key says of the device: the GPU's name, or the CPU's model and the thread count."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{model}:{torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU's kernels run asynchronously; nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, clock=time.perf_counter) -> float:
    """Median seconds of one call of ``fn`` (two warm-up calls; repeated for MIN_SECONDS, MIN_REPEATS to
    MAX_REPEATS times)."""
    for _ in range(2):
        fn()
    sync(device)
    times = []
    start = clock()
    while len(times) < MAX_REPEATS and (len(times) < MIN_REPEATS or clock() - start < MIN_SECONDS):
        t0 = clock()
        fn()
        sync(device)
        times.append(clock() - t0)
    return statistics.median(times)


def layer_ms(layer: nn.Module, x: torch.Tensor) -> float:
    """Milliseconds of one call of a layer on ``x`` (inference mode, :func:`time_call`)."""
    with torch.inference_mode():
        return time_call(lambda: layer(x), x.device) * 1e3


def network_ms(net: nn.Module, inputs: tuple) -> float:
    """Milliseconds of one forward pass of a network (eval and inference mode, :func:`time_call`)."""
    with eval_mode(net), torch.inference_mode():
        return time_call(lambda: run_on(net, inputs), inputs[0].device) * 1e3


@dataclass
class Table:
    """One layer's measured times (ms) over kept input and output widths."""

    widths_in: list[int]
    widths_out: list[int]
    ms: list[list[float]]   # ms[i][j]: widths_in[i] input and widths_out[j] output channels

    def points(self):
        for i, ci in enumerate(self.widths_in):
            for j, co in enumerate(self.widths_out):
                yield ci, co, self.ms[i][j]

    def at(self, c_in: float, c_out: float) -> float:
        """The time at ``c_in`` input and ``c_out`` output channels: the table's own entry at its widths,
        bilinear between them, the nearest entry beyond them."""
        (i0, i1, u), (j0, j1, v) = _bracket(self.widths_in, c_in), _bracket(self.widths_out, c_out)
        m = self.ms
        return ((1 - u) * ((1 - v) * m[i0][j0] + v * m[i0][j1])
                + u * ((1 - v) * m[i1][j0] + v * m[i1][j1]))


def _bracket(ws: list[int], w: float) -> tuple[int, int, float]:
    """(index below, index above, the share of the way from one to the other) of ``w`` in the sorted ``ws``."""
    if w <= ws[0] or len(ws) == 1:
        return 0, 0, 0.0
    if w >= ws[-1]:
        return len(ws) - 1, len(ws) - 1, 0.0
    hi = next(k for k, x in enumerate(ws) if x >= w)
    if ws[hi] == w:
        return hi, hi, 0.0
    return hi - 1, hi, (w - ws[hi - 1]) / (ws[hi] - ws[hi - 1])


def _widths(full: int, gated: bool, grid, multiple: int = 1, lattice: int | None = None) -> list[int]:
    """The kept widths a table measures: ``full`` alone for an ungated side; with a ``lattice`` (the budget's
    round_to), every multiple of it up to ``full`` where there are at most LATTICE_POINTS of them (the widths
    the budget can choose, each measured), else the grid's fractions on the lattice."""
    if not gated:
        return [full]
    step = math.lcm(multiple, lattice) if lattice else multiple
    if lattice and grid is not None and full // step <= LATTICE_POINTS:
        return sorted({*range(step, full + 1, step), full})
    if grid is None:   # the two-point level of the time bound
        grid = (GRID[0], 1.0)
    return sorted({max(step, int(round(f * full / step)) * step) for f in grid} | {full})


def _layer(m: nn.Module, c_in: int, c_out: int) -> nn.Module:
    """A fresh layer like ``m`` with ``c_in`` input and ``c_out`` output channels (one width: BatchNorm and
    depthwise convolution, ``c_out``)."""
    if isinstance(m, nn.BatchNorm2d):
        return nn.BatchNorm2d(c_out, affine=m.affine)
    if isinstance(m, nn.Linear):
        return nn.Linear(c_in, c_out, bias=m.bias is not None)
    depthwise = is_depthwise(m)
    groups = c_out if depthwise else m.groups
    return nn.Conv2d(c_out if depthwise else c_in, c_out, m.kernel_size, m.stride, m.padding, m.dilation, groups,
                     m.bias is not None, m.padding_mode)


def _signature(m: nn.Module, shape: tuple) -> dict:
    """What a layer's time depends on, but for its widths: the key of its table (with the device's)."""
    if isinstance(m, nn.Conv2d):
        return {"type": "conv2d", "in": m.in_channels, "out": m.out_channels, "kernel": list(m.kernel_size),
                "stride": list(m.stride), "padding": list(m.padding) if not isinstance(m.padding, str) else m.padding,
                "dilation": list(m.dilation), "groups": "depthwise" if is_depthwise(m) else m.groups,
                "bias": m.bias is not None, "padding_mode": m.padding_mode, "input": list(shape)}
    if isinstance(m, nn.Linear):
        return {"type": "linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None,
                "input": list(shape)}
    return {"type": "batchnorm2d", "channels": m.num_features, "affine": m.affine, "input": list(shape)}


def _input_shapes(model: nn.Module, inputs, modules) -> dict[nn.Module, tuple]:
    """The input of each module per call, but for its batch and channels (the spatial size, or the features'
    leading dims for a Linear)."""
    shapes = {}

    def hook(module, args):
        x = args[0]
        shapes[module] = tuple(x.shape[2:]) if x.dim() > 2 and not isinstance(module, nn.Linear) \
            else tuple(x.shape[1:-1])

    run_hooked(model, inputs, modules, hook, pre=True)
    return shapes


def _measure(m: nn.Module, table_in: list[int], table_out: list[int], batch: int, shape: tuple, device, dtype,
             tick) -> Table:
    ms = []
    for c_in in table_in:
        row = []
        for c_out in table_out:
            layer = _layer(m, c_in, c_out).to(device=device, dtype=dtype).eval()
            width = c_out if per_channel(m) else c_in
            x = torch.randn(batch, *shape, width, device=device, dtype=dtype) if isinstance(m, nn.Linear) \
                else torch.randn(batch, width, *shape, device=device, dtype=dtype)
            row.append(layer_ms(layer, x))
            tick()
        ms.append(row)
    return Table(table_in, table_out, ms)


def fit(table: Table, one_width: bool = False) -> tuple[float, float, float, float]:
    """``(a, b, c, d)`` of ``t = a + b * c_in + c * c_out + d * c_in * c_out`` fitted to a table by least squares
    relative to each time, with ``b, c, d >= 0`` (the best fit over the subsets of them left free); a width that
    does not vary gets no coefficient of its own (``one_width``: ``t = a + c * c_out``)."""
    pts = list(table.points())
    t = torch.tensor([p[2] for p in pts], dtype=torch.float64)
    ci = torch.tensor([float(p[0]) for p in pts], dtype=torch.float64)
    co = torch.tensor([float(p[1]) for p in pts], dtype=torch.float64)
    columns = {"b": ci, "c": co, "d": ci * co}
    if one_width:
        columns = {"c": co}
    if len(set(table.widths_in)) < 2:
        columns.pop("b", None)
        columns.pop("d", None)
    if len(set(table.widths_out)) < 2:
        columns.pop("c", None)
        columns.pop("d", None)
    w = 1.0 / t.clamp_min(1e-9)
    best = None
    names = list(columns)
    for mask in range(1 << len(names)):
        free = [n for k, n in enumerate(names) if mask >> k & 1]
        X = torch.stack([torch.ones_like(t)] + [columns[n] for n in free], 1)
        sol = torch.linalg.lstsq(X * w[:, None], (t * w)[:, None]).solution[:, 0]
        if any(float(v) < 0 for v in sol[1:]):
            continue
        err = float((((X @ sol) - t) * w).pow(2).sum())
        if best is None or err < best[0] - 1e-15:
            best = (err, dict(zip(["a"] + free, sol.tolist())))
    coef = best[1]
    return coef["a"], coef.get("b", 0.0), coef.get("c", 0.0), coef.get("d", 0.0)


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        warnings.warn(f"latency cache {path} is unreadable ({exc}); measuring anew and rewriting it")
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("tables"), dict):
        warnings.warn(f"latency cache {path} is not a table file of this version; measuring anew and rewriting it")
        return {}
    return data["tables"]


def _save(path: Path | None, stored: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"format": CACHE_FORMAT, "tables": stored}, sort_keys=True))


def _table_of(entry) -> Table | None:
    try:
        table = Table([int(v) for v in entry["widths_in"]], [int(v) for v in entry["widths_out"]],
                      [[float(v) for v in row] for row in entry["ms"]])
    except (KeyError, TypeError, ValueError):
        return None
    ok = len(table.ms) == len(table.widths_in) and all(len(r) == len(table.widths_out) for r in table.ms)
    return table if ok and all(v > 0 and v == v and v != float("inf") for r in table.ms for v in r) else None


@dataclass
class LatencyCost:
    """What :func:`latency_cost` measured and fitted; the cost model is registered on the bank as ``latency``."""

    key: dict                                  # device, threads, dtype, batch, torch version of every table
    tables: dict[str, Table]                   # layer name -> its table
    coefs: dict[str, tuple[float, ...]]        # layer name -> (a, b, c, d) in ms
    dense_ms: float                            # the dense network, measured
    scale: float                               # measured network time per ms of the layers' isolated times
    calibration: tuple[float, float]           # (the layers' sum, the measured dense network), ms
    measured: int                              # tables measured now (the others came from the cache)
    seconds: float                             # time the build took
    cache: Path | None = None
    model: object = field(default=None, repr=False)   # the CostModel (fitted: the penalty's)
    lookup: object = field(default=None, repr=False)  # the LookupCost (the tables: the budget's)
    per_element: float = 0.0                          # ms per element a layer reads (compose)

    def predict(self, model: nn.Module) -> float:
        """Predicted latency (ms) of the network ``model``'s hard gates extract to."""
        return find_bank(model).hard_cost("latency")


def latency_cost(model: nn.Module, example_inputs, *, cache: "str | os.PathLike | None" = None,
                 max_seconds: float = 120.0, progress: bool = False, grid=GRID) -> LatencyCost:
    """Measure the latency tables of a gated model and register its ``latency`` cost (ms per batch) on the bank.

    Args:
        model: a model gated by :func:`~polarprune_cuda.attach_gates`, on the device to measure on.
        example_inputs: one batch on that device, of the batch size and dtype the latency is for.
        cache: the tables' JSON file (default :func:`default_cache`); ``False`` measures without one.
        max_seconds: the bound on the build: the grid shrinks (to two widths a side at least) so that the
            layers still to measure fit in it, estimated from the full-width time of each.
        progress: a progress bar over the layers to measure.
        grid: the kept-width fractions measured (a layer's width that no gate changes is measured at full).

    Returns the :class:`LatencyCost`; ``meet_target(model, t, "latency")`` and
    ``PolarizationLoss(cost="latency")`` then use it.
    """
    start = time.perf_counter()
    bank = find_bank(model)
    sites = sites_of(model)   # refuses a model without gates
    inputs = as_inputs(example_inputs)
    if not (isinstance(max_seconds, (int, float)) and not isinstance(max_seconds, bool) and max_seconds > 0):
        raise ValueError(f"max_seconds must be a positive number, got {max_seconds!r}")
    device, dtype, batch = inputs[0].device, inputs[0].dtype, int(inputs[0].shape[0])
    if not dtype.is_floating_point:
        raise ValueError(f"example_inputs must be floating point (the dtype the latency is for), got {dtype}")
    key = {"device": device_name(device), "dtype": str(dtype).removeprefix("torch."), "batch": batch,
           "torch": torch.__version__.split("+")[0]}
    lattice = bank.surgery.round_to if bank.surgery.round_to and bank.surgery.round_to > 1 else None
    path = None if cache is False else Path(cache) if cache is not None else default_cache()
    stored = _load_cache(path) if path is not None else {}
    shapes = _input_shapes(model, inputs, [s.module for s in sites])
    plan = []   # (site, table key) of the sites whose table is not stored
    tables: dict[str, Table] = {}
    signatures = []
    for site in sites:
        if site.module not in shapes:
            continue   # not called in the forward pass: costs nothing
        m = site.module
        sig = json.dumps({**_signature(m, shapes[site.module]), **key, **({"lattice": lattice} if lattice else {})},
                         sort_keys=True)
        signatures.append([site.name, sig])
        table = _table_of(stored.get(sig)) if sig in stored else None
        if table is not None:
            tables[site.name] = table
        else:
            plan.append((site, sig))
    measured = _build(plan, tables, stored, path, shapes, batch, device, dtype, grid, max_seconds, progress, lattice)
    coefs = {name: fit(t, per_channel(model.get_submodule(name))) for name, t in tables.items()}
    n, sizes = bank.scores.numel(), bank.sizes
    # the dense network's time is cached too, under the network (its layers and groups) and the device's key
    network = hashlib.sha256(json.dumps([signatures, bank.sizes]).encode()).hexdigest()
    net_key = json.dumps({"network": network, **key}, sort_keys=True)
    elements = {s.name: batch * math.prod(shapes[s.module]) for s in sites if s.name in tables}
    raw = LookupCost(bank, sites, tables, elements)
    point = _point_of(stored.get(net_key))
    if point is None:
        point = raw.total, dense_ms(model, inputs)
        stored[net_key] = {"calibration": list(point)}
        _save(path, stored)
    scale, per_element = compose(point, raw.read_total())
    for name in coefs:   # the fit for the penalty: scaled, plus the reads' time per channel
        a, b, c, d = (scale * v for v in coefs[name])
        if per_channel(model.get_submodule(name)):
            c += per_element * elements[name]
        else:
            b += per_element * elements[name]
        coefs[name] = (a, b, c, d)
    cm = fitted_cost_model(n, sizes, sites, coefs, 0.0)
    lookup = LookupCost(bank, sites, tables, elements, scale, per_element)
    bank.set_cost("latency", cm, exact=lookup)
    return LatencyCost(key, tables, coefs, point[1], scale, point, measured, time.perf_counter() - start, path,
                       model=cm, lookup=lookup, per_element=per_element)


def compose(point: tuple[float, float], read: float) -> tuple[float, float]:
    """(scale, per_element) of the network's time: ``scale * (the layers' sum) + per_element * (the input
    elements the layers read)``. What the dense network takes beyond its layers' sum (``point``) goes to the
    reads (``read`` elements in the dense network): inside the network a layer's input comes from memory, not
    the cache it stayed in when timed alone, and the activations, additions and pooling between the layers grow
    with the reads too; a network faster than its layers' sum is scaled down instead."""
    layers, network = point
    if network >= layers and read > 0:
        return 1.0, (network - layers) / read
    return network / layers, 0.0


def dense_ms(model: nn.Module, inputs) -> float:
    """The measured time (ms) of the gated model's dense network: extracted with every gate open, gates folded."""
    bank = find_bank(model)
    saved = bank.scores.detach().clone()
    try:
        with torch.no_grad():
            bank.scores.fill_(1.0)
        net = extract(model, inputs, verify=False).eval()
    finally:
        with torch.no_grad():
            bank.scores.copy_(saved)
    return network_ms(net, inputs)


def _point_of(entry) -> tuple[float, float] | None:
    """The cached (layers' sum, dense network) of a network, or None where there is none (or it is damaged)."""
    try:
        a, b = (float(v) for v in entry["calibration"])
    except (KeyError, TypeError, ValueError):
        return None
    return (a, b) if math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0 else None


def _build(plan, tables, stored, path, shapes, batch, device, dtype, grid, max_seconds, progress,
           lattice: int | None = None) -> int:
    """Measure the tables in ``plan`` (the same key once), within ``max_seconds``; store each in the cache."""
    if not plan:
        return 0
    unique: dict[str, Site] = {}
    for site, sig in plan:
        unique.setdefault(sig, site)
    # each point costs about its full-width call times the repeats (MIN_SECONDS at least): the finest level that
    # fits in max_seconds (every lattice width, the grid, every other grid fraction, two widths a side)
    per_point = {}
    for sig, site in unique.items():
        m = site.module
        full_ms = _measure(m, [widths(m)[0]], [widths(m)[1]], batch, shapes[m], device, dtype, lambda: None).ms[0][0]
        per_point[sig] = max(full_ms * 1e-3 * MIN_REPEATS, MIN_SECONDS) + 2 * full_ms * 1e-3
    fine = tuple(sorted(set(grid) | {1.0}))
    levels = [(fine, lattice), (fine, None), (tuple(sorted(set(fine[::2]) | {1.0})), None), (None, None)]
    for grids, lat in levels:
        planned = {sig: _table_widths(site, grids, lat) for sig, site in unique.items()}
        if sum(per_point[sig] * len(w[0]) * len(w[1]) for sig, w in planned.items()) <= max_seconds:
            break
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:   # the core install has no tqdm: no bar
            tqdm = None
    if progress and tqdm is not None:
        bar = tqdm(total=sum(len(w[0]) * len(w[1]) for w in planned.values()), desc="latency tables",
                   unit="point", leave=False)
    try:
        for sig, site in unique.items():
            m = site.module
            w_in, w_out = planned[sig]
            table = _measure(m, w_in, w_out, batch, shapes[m], device, dtype, bar.update if bar else lambda: None)
            stored[sig] = {"widths_in": table.widths_in, "widths_out": table.widths_out, "ms": table.ms}
            _save(path, stored)
            for s, sg in plan:
                if sg == sig:
                    tables[s.name] = table
    finally:
        if bar is not None:
            bar.close()
    return len(unique)


def _table_widths(site: Site, grid, lattice: int | None) -> tuple[list[int], list[int]]:
    """The (input, output) widths a site's table is measured at (input [0] for a one-width layer)."""
    m = site.module
    multiple = m.groups if isinstance(m, nn.Conv2d) and not site.per_channel else 1
    w_in = [0] if site.per_channel else _widths(widths(m)[0], bool(site.ins), grid, multiple, lattice)
    return w_in, _widths(widths(m)[1], bool(site.outs), grid, multiple, lattice)


class LookupCost:
    """The predicted latency of a hard gate set read from the tables (the budget's exact cost): each layer's
    time at its kept widths, the table's own entry where it measured those widths, bilinear between entries,
    times ``scale``, plus ``per_element`` ms per element of its input (:func:`compose`); a layer inside a
    closed block costs nothing (ms)."""

    def __init__(self, bank, sites: list[Site], tables: dict[str, Table], elements: dict[str, int],
                 scale: float = 1.0, per_element: float = 0.0):
        self.bank, self.scale, self.per_element = bank, float(scale), float(per_element)
        self.sites = [(s, tables[s.name]) for s in sites if s.name in tables]
        self.elements = elements   # layer name -> its input's elements per channel
        self.total = self.cost(torch.ones(bank.scores.numel()))

    def read_total(self) -> float:
        """The input elements every layer of the dense network reads."""
        return sum(self.elements[s.name] * (c_out if s.per_channel else c_in)
                   for (s, _), (c_in, c_out) in zip(self.sites, self._widths(torch.ones(self.bank.scores.numel()))))

    def _widths(self, gates: torch.Tensor) -> list[tuple[float, float] | None]:
        g = gates.detach().double().cpu()
        sums = [float(v) for v in torch.stack([c.sum() for c in g.split(self.bank.sizes)])] if g.numel() else []
        offsets = self.bank.offsets
        out = []
        for site, _ in self.sites:
            if site.block is not None and float(g[offsets[site.block[0]]]) <= 0:
                out.append(None)   # the branch is removed with its block
                continue
            out.append((sum(share * sums[a] for a, share in site.ins) + site.f_in,
                        sum(share * sums[b] for b, share in site.outs) + site.f_out))
        return out

    def layers(self, gates: torch.Tensor) -> dict[str, float]:
        """Each layer's predicted time (ms) under ``gates`` (effective 0/1 gates)."""
        out = {}
        for (site, table), w in zip(self.sites, self._widths(gates)):
            if w is not None:
                read = self.elements[site.name] * (w[1] if site.per_channel else w[0])
                out[site.name] = self.scale * table.at(*w) + self.per_element * read
        return out

    def cost(self, gates: torch.Tensor) -> float:
        return sum(self.layers(gates).values())
