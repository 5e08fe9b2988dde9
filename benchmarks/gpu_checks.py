"""Correctness, limit, determinism checks and timings of the gate ops on a GPU, recorded case by case.

    python3 benchmarks/gpu_checks.py --out OUT --json checks.json --sections correctness,limits,determinism
    python3 benchmarks/gpu_checks.py --out OUT --json timings.json --sections timings,bank,training
    python3 benchmarks/gpu_checks.py --summary OUT        # OUT/summary.md from the files of a campaign
    TRITON_INTERPRET=1 python3 benchmarks/gpu_checks.py --tiny --device cpu --out /tmp/c   # the CPU smoke run

benchmarks/gpu_first.sh runs it on the device machine. Sections:

* ``correctness``: every op (binary_gate, gate_penalty, gate_bank, channel_gate, gated_affine, each with its
  backward) of the CUDA extension and of Triton against the reference (ops/reference.py) computed on float64
  inputs, per dtype (float32, float16, bfloat16, float64), NCHW and channels_last, sizes past 2^24 elements.
  A provider passes when its relative error ||out - ref64|| / ||ref64|| is at most twice the reference's own
  error in that dtype plus a floor per dtype (FLOOR); hard gates must match exactly; NaN never passes.
* ``limits``: the launch-grid probes (channels_last 1x64x1024x2048 bf16, NCHW C=16 with HW > 2^23, a 2-D
  (70000, C) input), forward and backward, both providers, against the float64 reference.
* ``determinism``: every backward and reduction three times on the same inputs: bitwise equal or a failure.
* ``timings``: each op by provider (eager reference, torch.compile of the reference, Triton, CUDA), CUDA
  events around each call (warm-up, the L2 flushed before every call, median), with a device-to-device
  copy of the same bytes as the ceiling: achieved GB/s and the fraction of the copy's.
* ``bank``: the gate bank of a torchvision ResNet-50 (pp.attach_gates, pp.PolarizationLoss(cost="macs")):
  gates + fused penalty forward, backward, per provider, raw ops and the package's autograd op.
* ``training``: one ResNet-50 bf16 channels_last SGD step, gated (attach_gates + penalty) vs unpruned,
  interleaved, CUDA events.

Every case is written to the JSON as soon as it finishes (the file is replaced atomically), with its
status (pass, fail, error, skipped), the details and, for an exception, its traceback: a crash or a kill
leaves every finished case. Each section has a time budget (--budget-s NAME=SECONDS) and the run a
deadline (--deadline-s); cases past them are recorded as skipped. Exit status 1 when a case failed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "micro"))

import torch  # noqa: E402

FORMAT = 1
SECTIONS = ("correctness", "limits", "determinism", "timings", "bank", "training")
#: seconds per section (the full run); --budget-s overrides, --tiny uses TINY_BUDGET_S
BUDGET_S = {"correctness": 50, "limits": 20, "determinism": 15, "timings": 60, "bank": 20, "training": 35}
TINY_BUDGET_S = {name: 60 for name in SECTIONS}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
#: relative-error floor per dtype, added to twice the reference's own error in that dtype
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}
GOALS = {"channel_gate_backward_of_copy": 0.85, "channel_gate_backward_vs_compile": 1.25,
         "bank_us_per_direction": 15.0, "training_ratio": 1.02}
KERNEL_PROVIDERS = ("cuda", "triton")
#: ops timed under torch.compile too (each shape costs a compilation of seconds)
COMPILE_OPS = ("channel_gate", "binary_gate")
TIMING_PROVIDERS = ("eager", "compile", "triton", "cuda")


class Skip(Exception):
    """A case that cannot run here; the message says why."""


# ----------------------------------------------------------------------------- recording

class Recorder:
    """Cases in one JSON file, rewritten (atomically) after every case."""

    def __init__(self, path: Path, meta: dict, deadline: float):
        self.path = path
        self.deadline = deadline
        self.data = {"format": FORMAT, **meta, "sections": {}, "cases": []}
        self.section = None
        self.section_end = math.inf
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def begin(self, name: str, budget: float) -> None:
        self.section = name
        self.section_t0 = time.monotonic()
        self.section_end = min(self.section_t0 + budget, self.deadline)
        self.data["sections"][name] = {"budget_s": budget, "status": "running"}
        self.flush()

    def end(self) -> None:
        entry = self.data["sections"][self.section]
        entry["seconds"] = round(time.monotonic() - self.section_t0, 2)
        entry["status"] = "budget spent" if time.monotonic() > self.section_end else "done"
        self.flush()

    def left(self) -> float:
        return self.section_end - time.monotonic()

    def case(self, name: str, fn, **info) -> dict:
        """Run ``fn() -> dict`` (status pass/fail, detail, metrics) as one case and record it."""
        entry = {"section": self.section, "name": name, **info}
        t0 = time.monotonic()
        if time.monotonic() > self.section_end:
            entry.update(status="skipped", detail="the section's time budget (or the run's deadline) is spent")
        else:
            try:
                out = fn() or {}
                if torch.cuda.is_available():
                    torch.cuda.synchronize()       # an asynchronous kernel error belongs to this case
                entry.update({"status": "pass", **out})
            except Skip as exc:
                entry.update(status="skipped", detail=str(exc))
            except Exception as exc:  # every failure is recorded, never raised
                entry.update(status="error", detail=f"{type(exc).__name__}: {exc}"[:2000],
                             traceback=traceback.format_exc()[-6000:])
        entry["seconds"] = round(time.monotonic() - t0, 3)
        self.data["cases"].append(entry)
        self.flush()
        mark = {"pass": ".", "fail": "F", "error": "E", "skipped": "s"}[entry["status"]]
        print(f"[{mark}] {self.section}: {name} ({entry['seconds']:.2f} s)"
              + ("" if entry["status"] == "pass" else f": {entry.get('detail', '')[:300]}"), flush=True)
        return entry


# ----------------------------------------------------------------------------- providers and inputs

def kernel_providers(device: torch.device, wanted) -> dict:
    """name -> (ops dict or None, reason when None) for the CUDA extension and Triton on ``device``."""
    from polarprune_cuda.ops import backends

    out = {}
    for name in KERNEL_PROVIDERS:
        if name not in wanted:
            continue
        b = backends.get_backend(name)
        if not b.available:
            out[name] = (None, f"{name} backend unavailable: {b.reason}")
        elif name == "cuda" and device.type != "cuda":
            out[name] = (None, f"the CUDA extension runs CUDA tensors only (device {device.type})")
        elif name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            out[name] = (None, f"Triton on {device.type} tensors needs TRITON_INTERPRET=1")
        else:
            out[name] = (b.ops, None)
    return out


_COMPILED: dict = {}


def timing_impl(provider: str, op: str, kernels: dict):
    from polarprune_cuda.ops import reference

    if provider == "eager":
        return getattr(reference, op)
    if provider == "compile":
        if op not in _COMPILED:
            _COMPILED[op] = torch.compile(getattr(reference, op), dynamic=False)
        return _COMPILED[op]
    ops, reason = kernels.get(provider, (None, f"{provider} not requested"))
    if ops is None:
        raise Skip(reason)
    return ops[op]


def gen(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape, dtype, device, seed, channels_last=False) -> torch.Tensor:
    t = torch.randn(shape, generator=gen(seed, device), device=device, dtype=torch.float32).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def gate_values(c, dtype, device, seed) -> torch.Tensor:
    """Real-valued gates in [0.5, 1.5) with about a third of them closed (0)."""
    g = torch.rand(c, generator=gen(seed, device), device=device) + 0.5
    g[torch.rand(c, generator=gen(seed + 1, device), device=device) < 1 / 3] = 0
    return g.to(dtype)


_COSTS: dict = {}


def cost_model(n: int, device: torch.device, seed: int = 0):
    """A cost model with four segments, bilinear pairs (a self-pair too), a constant and per-gate costs (one per
    size and device: building one of 2^24 gates takes a while; the scores are drawn fresh for every case)."""
    key = (n, str(device))
    if key not in _COSTS:
        _COSTS.clear()
        _COSTS[key] = _cost_model(n, device, seed)
    return _COSTS[key]


def _cost_model(n: int, device: torch.device, seed: int):
    from polarprune_cuda.ops.cost import CostModel

    g = torch.Generator().manual_seed(seed)
    cuts = sorted({max(1, min(n - 1, int(n * f))) for f in (0.2, 0.5, 0.8)}) if n >= 4 else []
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [n])]
    k = len(sizes)
    pairs = {(i, (i + 1) % k): float(torch.rand(1, generator=g)) + 0.1 for i in range(k)}
    pairs[(0, 0)] = 0.5
    return CostModel.from_terms(n, sizes, {}, pairs, const=3.0, per_gate=torch.rand(n, generator=g)).to(device)


def up(x):
    """Float tensors to float64 (the reference's inputs); anything else unchanged."""
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if out.shape != ref.shape:
        return math.inf
    if not bool(torch.isfinite(out).all()):
        return math.inf
    denom = float(ref.norm())
    return float((out - ref).norm()) / (denom if denom > 0 else 1.0)


def compare(provider_out, args, op: str, exact=()) -> dict:
    """Errors of ``provider_out`` (tuple) against the float64 reference of ``op`` on ``args``."""
    from polarprune_cuda.ops import reference

    fn = getattr(reference, op)
    ref64 = fn(*[up(a) for a in args])
    ref_lo = fn(*args)
    ref64 = ref64 if isinstance(ref64, tuple) else (ref64,)
    ref_lo = ref_lo if isinstance(ref_lo, tuple) else (ref_lo,)
    outs = provider_out if isinstance(provider_out, tuple) else (provider_out,)
    result, bad = {}, []
    for i, (o, r64, rlo) in enumerate(zip(outs, ref64, ref_lo)):
        if o.dtype != rlo.dtype or o.shape != rlo.shape:
            bad.append(f"{op}[{i}]: {o.dtype} {tuple(o.shape)}, reference {rlo.dtype} {tuple(rlo.shape)}")
            continue
        err, err_ref = rel_err(o, r64), rel_err(rlo, r64)
        limit = 0.0 if i in exact else 2 * err_ref + FLOOR.get(rlo.dtype, 1e-5)
        result[f"{op}[{i}]"] = {"err": err, "ref_err": err_ref, "limit": limit}
        if not err <= limit:
            bad.append(f"{op}[{i}]: error {err:.3g} > limit {limit:.3g} (reference's own {err_ref:.3g})")
    return {"errors": result, "bad": bad}


def verdict(checks: list[dict]) -> dict:
    bad = [b for c in checks for b in c["bad"]]
    errors = {k: v for c in checks for k, v in c["errors"].items()}
    worst = max((v["err"] / v["limit"] if v["limit"] else (0.0 if v["err"] == 0 else math.inf)
                 for v in errors.values()), default=0.0)
    return {"status": "fail" if bad else "pass", "detail": "; ".join(bad)[:2000] or f"worst error/limit {worst:.3g}",
            "metrics": {"errors": errors}}


# ----------------------------------------------------------------------------- the op checks (one per op group)

def check_binary_gate(ops, dtype, device, n, seed):
    s = randn((n,), dtype, device, seed)
    dg = randn((n,), dtype, device, seed + 1)
    checks = []
    for ste in ("identity", "clipped", "sigmoid"):
        checks.append(compare(ops["binary_gate"](s, ste, 0.7), (s, ste, 0.7), "binary_gate", exact=(0,)))
        checks.append(compare(ops["binary_gate_backward"](dg, s, ste, 0.7), (dg, s, ste, 0.7), "binary_gate_backward"))
    return checks


def penalty_args(s, cm, form):
    return (s, *cm.op_args(s.device), 1.0, 0.5, 2.0, 0.3, form, 0.8)


def check_gate_penalty(ops, dtype, device, n, seed):
    s = randn((n,), dtype, device, seed)
    cm = cost_model(n, device, seed)
    checks = []
    for form in ("zhuang", "bimodal"):
        args = penalty_args(s, cm, form)
        checks.append(compare(ops["gate_penalty"](*args), args, "gate_penalty"))
    return checks


def bank_args(s, cm, ste="sigmoid", form="bimodal"):
    return (s, ste, *cm.op_args(s.device), 1.0, 0.5, form, 0.8)


def check_gate_bank(ops, dtype, device, n, seed):
    from polarprune_cuda.ops import reference

    s = randn((n,), dtype, device, seed)
    cm = cost_model(n, device, seed)
    checks = []
    for form in ("zhuang", "bimodal"):
        args = bank_args(s, cm, form=form)
        checks.append(compare(ops["gate_bank"](*args), args, "gate_bank", exact=(0,)))
    _, terms, gt, gp = reference.gate_bank(*bank_args(s, cm))
    dgates = randn((n,), dtype, device, seed + 2)
    dterms = randn((4,), terms.dtype, device, seed + 3)
    for ste in ("identity", "clipped", "sigmoid"):
        bargs = (dgates, dterms, s, gt, gp, ste, 1.0)
        checks.append(compare(ops["gate_bank_backward"](*bargs), bargs, "gate_bank_backward"))
    return checks


def check_channel_gate(ops, dtype, device, shape, seed, channels_last):
    x = randn(shape, dtype, device, seed, channels_last)
    dy = randn(shape, dtype, device, seed + 1, channels_last)
    g = gate_values(shape[1], dtype, device, seed + 2)
    y = ops["channel_gate"](x, g)
    dx, dg = ops["channel_gate_backward"](dy, x, g)
    checks = [compare(y, (x, g), "channel_gate"), compare((dx, dg), (dy, x, g), "channel_gate_backward")]
    if channels_last and x.dim() == 4:
        for name, t in (("channel_gate[0]", y), ("channel_gate_backward[0]", dx)):
            if not t.is_contiguous(memory_format=torch.channels_last):
                checks.append({"errors": {}, "bad": [f"{name}: channels_last input, output not channels_last"]})
    return checks


def check_gated_affine(ops, dtype, device, c, seed):
    w, b = randn((c,), dtype, device, seed), randn((c,), dtype, device, seed + 1)
    g = gate_values(c, dtype, device, seed + 2)
    gw, gb = randn((c,), dtype, device, seed + 3), randn((c,), dtype, device, seed + 4)
    return [compare(ops["gated_affine"](w, b, g), (w, b, g), "gated_affine"),
            compare(ops["gated_affine_backward"](gw, gb, w, b, g), (gw, gb, w, b, g), "gated_affine_backward")]


def sizes(tiny: bool):
    """(1-D sizes, 4-D shapes) of the correctness section; the last of each is past 2^24 elements (full run)."""
    if tiny:
        return (7, 300), ((2, 3, 5, 7), (2, 5, 4, 6))
    return (7, 26_560, 2 ** 24 + 11), ((2, 3, 5, 7), (8, 64, 28, 28), (2, 64, 363, 363))


def run_correctness(rec: Recorder, kernels: dict, device, dtypes, tiny: bool) -> None:
    """dtype by dtype (the order given), both providers: a spent budget cuts the last dtypes, not a provider."""
    ns, shapes = sizes(tiny)
    for prov, (ops, reason) in kernels.items():
        if ops is None:
            rec.case(f"{prov}: every op", skipper(reason), provider=prov)
    seed = 0
    for dname in dtypes:
        dtype = DTYPES[dname]
        for prov, (ops, _) in kernels.items():
            if ops is None:
                continue
            for n in ns:
                for op, fn in (("binary_gate", check_binary_gate), ("gate_penalty", check_gate_penalty),
                               ("gate_bank", check_gate_bank), ("gated_affine", check_gated_affine)):
                    seed += 10
                    rec.case(f"{prov} {op} {dname} n={n}",
                             lambda ops=ops, fn=fn, n=n, s=seed, d=dtype: verdict(fn(ops, d, device, n, s)),
                             provider=prov, op=op, dtype=dname, size=n)
            for shape in shapes:
                for cl in (False, True):
                    seed += 10
                    layout = "channels_last" if cl else "NCHW"
                    rec.case(f"{prov} channel_gate {dname} {shape} {layout}",
                             lambda ops=ops, shape=shape, s=seed, d=dtype, cl=cl: verdict(
                                 check_channel_gate(ops, d, device, shape, s, cl)),
                             provider=prov, op="channel_gate", dtype=dname, size=list(shape), layout=layout)


def run_failure_probe(rec: Recorder) -> None:
    """Deliberately failing cases (--inject-failure): they must be recorded, not raised."""
    def raises():
        raise RuntimeError("deliberate failure (--inject-failure)")

    def wrong():
        x = torch.randn(4, 4, dtype=torch.float64)
        return verdict([compare((x * 0 + 1,), (x, torch.ones(4, dtype=torch.float64)), "channel_gate")])

    rec.case("deliberate exception", raises)
    rec.case("deliberate wrong result", wrong)


def limit_cases(tiny: bool):
    """(name, shape, dtype, channels_last) of the launch-grid probes."""
    if tiny:
        return [("channels_last bf16 (tiny)", (1, 8, 16, 32), torch.bfloat16, True),
                ("NCHW C=4 large plane (tiny)", (1, 4, 64, 65), torch.float32, False),
                ("2-D (N, C) (tiny)", (300, 8), torch.float32, False)]
    return [("channels_last 1x64x1024x2048 bf16", (1, 64, 1024, 2048), torch.bfloat16, True),
            ("NCHW C=16 HW=8,396,800 (> 2^23) fp32", (1, 16, 2048, 4100), torch.float32, False),
            ("2-D (N=70000, C=64) fp32", (70_000, 64), torch.float32, False)]


def run_limits(rec: Recorder, kernels: dict, device, tiny: bool) -> None:
    for prov, (ops, reason) in kernels.items():
        for k, (name, shape, dtype, cl) in enumerate(limit_cases(tiny)):
            if ops is None:
                rec.case(f"{prov}: {name}", skipper(reason), provider=prov)
                continue
            rec.case(f"{prov}: {name}", lambda shape=shape, d=dtype, cl=cl, k=k: verdict(
                check_channel_gate(ops, d, device, shape, 1000 + k, cl)), provider=prov, size=list(shape))
            torch.cuda.empty_cache() if device.type == "cuda" else None


def bits(t: torch.Tensor) -> torch.Tensor:
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
    return t.detach().contiguous().view(view) if t.is_floating_point() else t


def deterministic(fn, runs: int = 3) -> dict:
    first = [bits(o).clone() for o in _tuple(fn())]
    differ = []
    for r in range(1, runs):
        for i, o in enumerate(_tuple(fn())):
            if not torch.equal(bits(o), first[i]):
                differ.append(f"output {i} differs in run {r + 1}")
    return {"status": "fail" if differ else "pass", "detail": "; ".join(differ) or f"{runs} runs bitwise equal"}


def skipper(reason: str):
    """A case function that records ``reason`` as the case's skip reason."""
    def fn():
        raise Skip(reason)
    return fn


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def run_determinism(rec: Recorder, kernels: dict, device, tiny: bool) -> None:
    n = 300 if tiny else 2 ** 22 + 5
    shape = (2, 5, 4, 6) if tiny else (32, 256, 56, 56)
    for prov, (ops, reason) in kernels.items():
        if ops is None:
            rec.case(f"{prov}: every reduction", skipper(reason), provider=prov)
            continue
        s = randn((n,), torch.float32, device, 7)
        dg = randn((n,), torch.float32, device, 8)
        cm = cost_model(n, device)
        dterms = randn((4,), torch.float32, device, 9)
        cases = {
            "binary_gate_backward": lambda: ops["binary_gate_backward"](dg, s, "sigmoid", 0.7),
            "gate_penalty": lambda: ops["gate_penalty"](*penalty_args(s, cm, "bimodal")),
            "gate_bank": lambda: ops["gate_bank"](*bank_args(s, cm)),
            "gate_bank_backward": lambda: ops["gate_bank_backward"](dg, dterms, s, dg, s, "sigmoid", 1.0),
            "gated_affine_backward": lambda: ops["gated_affine_backward"](dg, s, s, dg, dg),
        }
        for dname in ("bfloat16", "float32"):
            for cl in (False, True):
                x = randn(shape, DTYPES[dname], device, 10, cl)
                dy = randn(shape, DTYPES[dname], device, 11, cl)
                g = gate_values(shape[1], DTYPES[dname], device, 12)
                layout = "channels_last" if cl else "NCHW"
                cases[f"channel_gate_backward {dname} {layout}"] = (
                    lambda dy=dy, x=x, g=g: ops["channel_gate_backward"](dy, x, g))
        for name, fn in cases.items():
            rec.case(f"{prov}: {name}", lambda fn=fn: deterministic(fn), provider=prov, op=name)


# ----------------------------------------------------------------------------- timing

def timer(device: torch.device, tiny: bool):
    """``time(fn, rep_ms) -> dict`` of microseconds. On a GPU: warm-up calls, then each call alone between two
    CUDA events, the L2 flushed before each (a 256 MB write), as many calls as fit in ``rep_ms`` (10 to 500),
    the median kept; on a CPU, the host clock."""
    if device.type == "cuda":
        flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=device)

        def run(fn, rep_ms: float = 40.0):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(5):
                fn()
            b.record()
            b.synchronize()
            count = int(min(500, max(10, rep_ms / max(a.elapsed_time(b) / 5, 1e-3))))
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
            for s, e in zip(starts, ends):
                flush.zero_()
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize()
            return _stats([1e3 * s.elapsed_time(e) for s, e in zip(starts, ends)])
    else:
        def run(fn, rep_ms: float = 0.0):
            fn()
            samples = []
            for _ in range(2 if tiny else 10):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e6)
            return _stats(samples)
    return run


def _stats(us: list[float]) -> dict:
    us = sorted(us)
    q = statistics.quantiles(us, n=4) if len(us) >= 2 else [us[0]] * 3
    return {"us": statistics.median(us), "min_us": us[0], "iqr_us": q[2] - q[0], "samples": len(us)}


def timing_cases(device, tiny: bool):
    """(op, direction, label, floor bytes, make) where make() -> (forward-op name, args)."""
    if tiny:
        shapes = [((2, 8, 6, 6), torch.float32, True)]
        n = 512
    else:
        shapes = [((256, 256, 56, 56), torch.bfloat16, True), ((256, 64, 112, 112), torch.bfloat16, False),
                  ((128, 2048, 7, 7), torch.bfloat16, True), ((256, 256, 56, 56), torch.float32, True)]
        n = 2 ** 26
    out = []
    for shape, dtype, cl in shapes:
        numel, es = math.prod(shape), torch.tensor([], dtype=dtype).element_size()
        label = f"{shape} {str(dtype)[6:]} {'channels_last' if cl else 'NCHW'}"

        def make(shape=shape, dtype=dtype, cl=cl):
            x, dy = randn(shape, dtype, device, 1, cl), randn(shape, dtype, device, 2, cl)
            g = gate_values(shape[1], dtype, device, 3)
            return {"forward": ("channel_gate", (x, g)), "backward": ("channel_gate_backward", (dy, x, g))}
        out.append(("channel_gate", label, {"forward": 2 * numel * es, "backward": 3 * numel * es}, make))

    def make_gate():
        s, dg = randn((n,), torch.float32, device, 4), randn((n,), torch.float32, device, 5)
        return {"forward": ("binary_gate", (s, "sigmoid", 1.0)),
                "backward": ("binary_gate_backward", (dg, s, "sigmoid", 1.0))}

    def make_affine():
        w, b, g, gw, gb = (randn((n // 4,), torch.float32, device, k) for k in range(6, 11))
        return {"forward": ("gated_affine", (w, b, g)), "backward": ("gated_affine_backward", (gw, gb, w, b, g))}

    def make_penalty():
        from polarprune_cuda.ops.cost import CostModel

        s = randn((n // 4,), torch.float32, device, 12)
        cm = CostModel.channels(n // 4, device)
        return {"forward": ("gate_penalty", penalty_args(s, cm, "bimodal"))}

    m = n // 4
    out += [("binary_gate", f"n={n} float32", {"forward": 8 * n, "backward": 12 * n}, make_gate),
            ("gated_affine", f"C={m} float32", {"forward": 20 * m, "backward": 32 * m}, make_affine),
            ("gate_penalty", f"n={m} float32, channels cost", {"forward": 12 * m}, make_penalty)]
    return out


def last_compile(providers) -> list:
    """The providers with torch.compile last: its compilations must not eat the kernels' time budget."""
    return [p for p in providers if p != "compile"] + [p for p in providers if p == "compile"]


def run_timings(rec: Recorder, kernels: dict, device, providers, tiny: bool) -> None:
    time_fn = timer(device, tiny)
    copies: dict[int, dict] = {}

    def copy_ceiling(nbytes: int) -> dict:
        if nbytes not in copies:
            half = max(1, nbytes // 2)
            src = torch.randint(0, 255, (half,), dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            t = time_fn(lambda: dst.copy_(src))
            copies[nbytes] = {**t, "GBps": 2 * half / (t["us"] * 1e-6) / 1e9}
            del src, dst
        return copies[nbytes]

    for op, label, floors, make in timing_cases(device, tiny):
        err = None
        try:
            inputs = make()
        except Exception as exc:   # e.g. out of memory: every provider of the case records it
            inputs, err = None, f"{type(exc).__name__}: {exc}"
        for direction, floor in floors.items():
            copy = None
            for prov in last_compile(providers):
                def one(prov=prov, direction=direction, floor=floor):
                    nonlocal copy
                    if inputs is None:
                        raise RuntimeError(f"inputs could not be made: {err}")
                    if prov == "compile" and tiny:
                        raise Skip("torch.compile is not timed in the tiny run")
                    if prov == "compile" and op not in COMPILE_OPS:
                        raise Skip(f"torch.compile is timed for {', '.join(COMPILE_OPS)} only (compile time)")
                    name, args = inputs[direction]
                    fn = timing_impl(prov, name, kernels)
                    t0 = time.monotonic()
                    fn(*args)              # first call: compilation stays out of the timing
                    first_s = time.monotonic() - t0
                    t = time_fn(lambda: fn(*args))
                    copy = copy or copy_ceiling(floor)
                    gbps = floor / (t["us"] * 1e-6) / 1e9
                    return {"detail": f"{t['us']:.1f} us, {gbps:.0f} GB/s = {gbps / copy['GBps']:.0%} of copy",
                            "metrics": {**t, "floor_bytes": floor, "GBps": gbps, "copy_us": copy["us"],
                                        "copy_GBps": copy["GBps"], "of_copy": gbps / copy["GBps"],
                                        "first_call_s": round(first_s, 3)}}
                rec.case(f"{op} {direction} {label} {prov}", one, op=op, direction=direction, case=label,
                         provider=prov)
        inputs = None      # free the case's tensors before the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()


def resnet50_bank(device, tiny: bool):
    import torchvision

    import polarprune_cuda as pp

    model = torchvision.models.resnet50()
    size = 64 if tiny else 224
    pp.attach_gates(model, torch.randn(1, 3, size, size))
    loss = pp.PolarizationLoss(0.5, cost="macs")
    bank = pp.find_bank(model).to(device)
    cm = bank.cost_model("macs")
    return bank, cm, loss


def run_bank(rec: Recorder, kernels: dict, device, providers, tiny: bool) -> None:
    """ResNet-50 gate bank: gates + fused penalty, forward and backward, per provider and through the package."""
    from polarprune_cuda import ops as pops
    from polarprune_cuda.ops import backends

    time_fn = timer(device, tiny)
    state = {}

    def setup():
        bank, cm, loss = resnet50_bank(device, tiny)
        s = bank.scores.detach().clone()
        n = s.numel()
        state.update(bank=bank, cm=cm, loss=loss, s=s, dg=randn((n,), s.dtype, device, 20),
                     dterms=torch.tensor([0.0, 1.0, 1.0, 0.0], device=device, dtype=s.dtype))
        return {"detail": f"{n} gates, {cm.num_segments} segments, {cm.pairs.shape[0]} pairs",
                "metrics": {"gates": n, "segments": cm.num_segments, "pairs": int(cm.pairs.shape[0])}}

    rec.case("ResNet-50 bank (attach_gates, macs cost)", setup)
    if not state:
        return
    s, cm, loss, bank = state["s"], state["cm"], state["loss"], state["bank"]
    fargs = (s, bank.ste, *cm.op_args(device), bank.tau, loss.rho, loss.polarization, loss.t)
    from polarprune_cuda.ops import reference
    _, _, gt, gp = reference.gate_bank(*fargs)
    bargs = (state["dg"], state["dterms"], s, gt, gp, bank.ste, bank.tau)
    def raw(prov):
        for direction, op, args in (("forward", "gate_bank", fargs), ("backward", "gate_bank_backward", bargs)):
            def one(prov=prov, op=op, args=args):
                if prov == "compile" and tiny:
                    raise Skip("torch.compile is not timed in the tiny run")
                fn = timing_impl(prov, op, kernels)
                fn(*args)
                t = time_fn(lambda: fn(*args), 25.0)
                return {"detail": f"{t['us']:.1f} us", "metrics": t}
            rec.case(f"bank {direction} op {prov}", one, op=op, direction=direction, provider=prov, path="op")

    for prov in providers:
        if prov != "compile":
            raw(prov)
    # the package's op with autograd (what a training step runs), per backend forced through POLARPRUNE_BACKEND
    for prov in ("cuda", "triton", "torch"):
        def package(prov=prov):
            if prov != "torch":
                ops_, reason = kernels.get(prov, (None, f"{prov} not requested"))
                if ops_ is None:
                    raise Skip(reason)
            old = os.environ.get(backends.ENV_VAR)
            os.environ[backends.ENV_VAR] = prov
            backends._reset()
            try:
                sg = s.clone().requires_grad_()

                def fwd():
                    return pops.gate_bank(sg, bank.ste, bank.tau, cm, loss.rho, loss.polarization, loss.t)
                gates, terms = fwd()
                dgates, dterms = state["dg"], state["dterms"].to(terms.dtype)

                def bwd():
                    return torch.autograd.grad((gates, terms), sg, (dgates, dterms), retain_graph=True)
                bwd()
                tf, tb = time_fn(fwd, 25.0), time_fn(bwd, 25.0)
            finally:
                if old is None:
                    os.environ.pop(backends.ENV_VAR, None)
                else:
                    os.environ[backends.ENV_VAR] = old
                backends._reset()
            return {"detail": f"forward {tf['us']:.1f} us, backward {tb['us']:.1f} us",
                    "metrics": {"forward": tf, "backward": tb}}
        rec.case(f"bank package autograd {prov}", package, provider=prov, path="package")
    if "compile" in providers:
        raw("compile")


def run_training(rec: Recorder, device, tiny: bool) -> None:
    """One ResNet-50 SGD step, gated (polarprune) vs unpruned, interleaved round by round."""
    import common

    if tiny:
        setting = common.Setting("resnet50", 2, 32, "float32", False, 8)
    else:
        setting = common.Setting("resnet50", 64, 224, "bfloat16", True, 8)
    steps = {}

    def setup(variant):
        def fn():
            steps[variant] = common.training_step(variant, setting, device)[0]
            steps[variant]()
            return {"detail": f"{setting}"}
        return fn

    for variant in ("unpruned", "polarprune"):
        rec.case(f"ResNet-50 step setup {variant}", setup(variant), variant=variant)
    if len(steps) < 2:
        return

    def measure():
        def one(fn) -> float:
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                return a.elapsed_time(b)
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        names = list(steps)
        for _ in range(2):                 # warm-up (autotuning, allocator)
            for n in names:
                one(steps[n])
        times = {n: [] for n in names}
        rounds, max_rounds = 0, 3 if tiny else 30
        while rounds < max_rounds and (rounds < 3 or rec.left() > 4):
            order = names if rounds % 2 == 0 else names[::-1]
            for n in order:
                times[n].append(one(steps[n]))
            rounds += 1
        med = {n: statistics.median(v) for n, v in times.items()}
        paired = statistics.median(p / u for p, u in zip(times["polarprune"], times["unpruned"]))
        ratio = med["polarprune"] / med["unpruned"]
        return {"detail": f"gated {med['polarprune']:.2f} ms, unpruned {med['unpruned']:.2f} ms: {ratio:.3f}x "
                          f"(paired rounds {paired:.3f}x), {rounds} rounds",
                "metrics": {"setting": setting.to_dict(), "median_ms": med, "ratio": ratio, "paired_ratio": paired,
                            "rounds": rounds, "ms": times}}

    rec.case("ResNet-50 training step gated vs unpruned", measure)


# ----------------------------------------------------------------------------- facts

def facts(device: torch.device) -> dict:
    import polarprune_cuda as pp

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "device_type": device.type,
           "date": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception as exc:
        out["triton"] = f"unavailable: {exc}"
    out["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out.update(device=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2 ** 30, 1), l2_bytes=getattr(p, "L2_cache_size", None))
    else:
        out["device"] = f"CPU {platform.processor() or platform.machine()}"
    try:
        out["backends"] = pp.backend_info()["backends"]
    except Exception as exc:
        out["backends"] = f"backend_info failed: {exc}"
    return out


# ----------------------------------------------------------------------------- summary

def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cases(*results):
    return [c for r in results if r for c in r.get("cases", [])]


def goals(cases: list[dict]) -> list[str]:
    """The goal lines: met, NOT met, or not measured (and why)."""
    lines = []
    t = {(c.get("op"), c.get("direction"), c.get("case"), c.get("provider")): c for c in cases
         if c["section"] == "timings" and c["status"] == "pass"}
    bwd = [(k, c) for k, c in t.items() if k[0] == "channel_gate" and k[1] == "backward"]
    labels = sorted({k[2] for k, _ in bwd})
    if not labels:
        lines.append("- activation-gate (channel_gate) backward: **not measured** (no timing case passed)")
    for label in labels:
        kern = {k[3]: c["metrics"] for k, c in bwd if k[2] == label and k[3] in KERNEL_PROVIDERS}
        comp = t.get(("channel_gate", "backward", label, "compile"))
        if not kern:
            lines.append(f"- channel_gate backward {label}: **not measured** (no Triton or CUDA timing)")
            continue
        best_p, best = max(kern.items(), key=lambda kv: kv[1]["of_copy"])
        ok_bw = best["of_copy"] >= GOALS["channel_gate_backward_of_copy"]
        text = (f"- channel_gate backward {label}: best {best_p} {best['us']:.1f} us = {best['of_copy']:.0%} of copy "
                f"(goal >= {GOALS['channel_gate_backward_of_copy']:.0%}: {'met' if ok_bw else 'NOT met'})")
        if comp:
            speed = comp["metrics"]["us"] / best["us"]
            ok = speed >= GOALS["channel_gate_backward_vs_compile"]
            text += (f"; {speed:.2f}x torch.compile's {comp['metrics']['us']:.1f} us "
                     f"(goal >= {GOALS['channel_gate_backward_vs_compile']}x: {'met' if ok else 'NOT met'})")
        else:
            text += "; vs torch.compile: not measured"
        others = ", ".join(f"{p} {m['us']:.1f} us ({m['of_copy']:.0%})" for p, m in kern.items() if p != best_p)
        lines.append(text + (f"; {others}" if others else ""))
    pkg = {c["provider"]: c["metrics"] for c in cases
           if c["section"] == "bank" and c.get("path") == "package" and c["status"] == "pass"}
    ops_ = {(c["provider"], c["direction"]): c["metrics"]["us"] for c in cases
            if c["section"] == "bank" and c.get("path") == "op" and c["status"] == "pass"}
    goal = GOALS["bank_us_per_direction"]
    for prov in ("cuda", "triton", "torch"):
        if prov in pkg:
            f, b = pkg[prov]["forward"]["us"], pkg[prov]["backward"]["us"]
            ok = "met" if max(f, b) <= goal else "NOT met"
            raw = [f"{d} op {ops_[(prov if prov != 'torch' else 'eager', d)]:.1f} us" for d in ("forward", "backward")
                   if (prov if prov != "torch" else "eager", d) in ops_]
            lines.append(f"- ResNet-50 gate bank + penalty through the package ({prov}): forward {f:.1f} us, "
                         f"backward {b:.1f} us (goal <= {goal:g} us per direction: {ok})"
                         + (f"; raw {', '.join(raw)}" if raw else ""))
    if not pkg:
        lines.append("- ResNet-50 gate bank + penalty: **not measured**")
    train = next((c for c in cases if c["section"] == "training" and c["name"].endswith("vs unpruned")
                  and c["status"] == "pass"), None)
    if train:
        m = train["metrics"]
        ok = "met" if m["ratio"] <= GOALS["training_ratio"] else "NOT met"
        lines.append(f"- ResNet-50 training step ({m['setting']['dtype']}, batch {m['setting']['batch']}, "
                     f"{'channels_last' if m['setting']['channels_last'] else 'NCHW'}): gated "
                     f"{m['median_ms']['polarprune']:.2f} ms vs unpruned {m['median_ms']['unpruned']:.2f} ms = "
                     f"{m['ratio']:.3f}x (paired {m['paired_ratio']:.3f}x; goal <= {GOALS['training_ratio']}x: {ok})")
    else:
        lines.append("- ResNet-50 training step gated vs unpruned: **not measured**")
    return lines


def summary(out: Path) -> str:
    checks, timings = _load(out / "checks.json"), _load(out / "timings.json")
    cases = _cases(checks, timings)
    f = (checks or timings or {}).get("facts", {})
    lines = ["# GPU campaign summary", ""]
    if f:
        lines.append(f"Device: **{f.get('device')}** ({f.get('sm_count', '?')} SMs, capability "
                     f"{f.get('capability', '?')}), torch {f.get('torch')} (CUDA {f.get('torch_cuda')}), triton "
                     f"{f.get('triton')}, python {f.get('python')}, {f.get('date')}.")
        if f.get("device_type") != "cuda":
            lines.append("**Not a GPU run**: the goals are GPU goals; the figures below only show that the code runs.")
        be = f.get("backends")
        if isinstance(be, dict):
            lines.append("Backends: " + "; ".join(f"{k}: {'yes' if v['available'] else 'no'} ({v['reason']})"
                                                  for k, v in be.items()))
    steps = []
    log = out / "campaign.log"
    if log.is_file():
        steps = re.findall(r"STEP (\S+) status=(\S+) seconds=(\d+) limit=(\d+)", log.read_text(errors="replace"))
    if steps:
        lines += ["", "## Steps", "", "| step | status | seconds | limit s |", "|---|---|---:|---:|"]
        lines += [f"| {n} | {s} | {sec} | {lim} |" for n, s, sec, lim in steps]
    lines += ["", "## Goals", "", *goals(cases), ""]
    lines += ["## Checks", "", "| section | pass | fail | error | skipped | seconds (budget) |",
              "|---|---:|---:|---:|---:|---|"]
    for res in (checks, timings):
        for name, sec in (res or {}).get("sections", {}).items():
            cs = [c for c in res["cases"] if c["section"] == name]
            count = {k: sum(c["status"] == k for c in cs) for k in ("pass", "fail", "error", "skipped")}
            lines.append(f"| {name} | {count['pass']} | {count['fail']} | {count['error']} | {count['skipped']} | "
                         f"{sec.get('seconds', '?')} ({sec.get('budget_s')}; {sec.get('status')}) |")
    bad = [c for c in cases if c["status"] in ("fail", "error")]
    if bad:
        lines += ["", f"Failed or broken cases ({len(bad)}; the first 40):", ""]
        lines += [f"- {c['section']}: {c['name']}: **{c['status']}**: {c.get('detail', '')[:300]}" for c in bad[:40]]
    skipped = sorted({f"{c['section']}: {c.get('detail', '')[:200]}" for c in cases if c["status"] == "skipped"})
    if skipped:
        lines += ["", "Skipped, with the reasons:", ""] + [f"- {s}" for s in skipped[:20]]
    rows = [c for c in cases if c["section"] == "timings" and c["status"] == "pass"]
    if rows:
        lines += ["", "## Timings (median over calls timed alone by CUDA events, L2 flushed before each; copy = "
                      "device-to-device copy of the same bytes)", "",
                  "| op | direction | case | provider | us | GB/s | of copy |",
                  "|---|---|---|---|---:|---:|---:|"]
        for c in rows:
            m = c["metrics"]
            lines.append(f"| {c['op']} | {c['direction']} | {c['case']} | {c['provider']} | {m['us']:.1f} | "
                         f"{m['GBps']:.0f} | {m['of_copy']:.0%} |")
    bank_rows = [c for c in cases if c["section"] == "bank" and c["status"] == "pass" and c.get("path") == "op"]
    if bank_rows:
        lines += ["", "## ResNet-50 gate bank, raw ops", "", "| op | provider | us |", "|---|---|---:|"]
        lines += [f"| {c['op']} | {c['provider']} | {c['metrics']['us']:.1f} |" for c in bank_rows]
    lines += ["", "## Tests, sanitizer, build", ""]
    tests = out / "tests.txt"
    if tests.is_file():
        tail = [ln for ln in tests.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        lines.append(f"- tests (tests/ops on the GPU): {tail[0] if tail else 'no output'}")
    else:
        lines.append("- tests: no tests.txt")
    san = out / "sanitizer.txt"
    if san.is_file():
        text = san.read_text(errors="replace")
        found = re.findall(r"ERROR SUMMARY: .*", text)
        found = found[-1] if found else "no ERROR SUMMARY line (see sanitizer.txt)"
        lines.append(f"- compute-sanitizer memcheck: {found}")
    else:
        lines.append("- compute-sanitizer: no sanitizer.txt")
    build = out / "build.log"
    if build.is_file():
        text = build.read_text(errors="replace")
        regs = re.findall(r"Used (\d+) registers", text)
        spills = [s for s in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text) if s != ("0", "0")]
        lines.append(f"- ptxas: {len(regs)} kernels reported, registers max {max(map(int, regs)) if regs else '?'}, "
                     f"{len(spills)} with spills" + (f" {spills[:5]}" if spills else ""))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def parse_budgets(items, tiny: bool) -> dict:
    budgets = dict(TINY_BUDGET_S if tiny else BUDGET_S)
    for item in items or []:
        name, _, value = item.partition("=")
        if name not in SECTIONS or not value:
            raise SystemExit(f"--budget-s takes SECTION=SECONDS with SECTION in {', '.join(SECTIONS)}, got {item!r}")
        budgets[name] = float(value)
    return budgets


def main(argv=None) -> dict | str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("."), help="folder of the JSON")
    p.add_argument("--json", default="checks.json", help="file name (in --out) of the cases")
    p.add_argument("--sections", default="correctness,limits,determinism", help=f"any of {','.join(SECTIONS)}")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--tiny", action="store_true", help="small sizes (the CPU smoke run, the sanitizer run)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="dtypes of the correctness section")
    p.add_argument("--providers", default=",".join(TIMING_PROVIDERS), help="providers (kernels: cuda, triton)")
    p.add_argument("--budget-s", action="append", metavar="SECTION=SECONDS", help="a section's time budget")
    p.add_argument("--deadline-s", type=float, default=math.inf, help="stop starting cases after this many seconds")
    p.add_argument("--inject-failure", action="store_true", help="add deliberately failing cases (self-test)")
    p.add_argument("--summary", type=Path, default=None, metavar="OUT",
                   help="only write OUT/summary.md from OUT's checks.json, timings.json, tests.txt, ...")
    args = p.parse_args(argv)
    if args.summary is not None:
        text = summary(args.summary)
        (args.summary / "summary.md").write_text(text)
        print(text)
        return text
    t_start = time.monotonic()
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    budgets = parse_budgets(args.budget_s, args.tiny)
    providers = [q for q in args.providers.split(",") if q]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"mode": "tiny" if args.tiny else "full", "device": str(device), "command": " ".join(sys.argv),
            "budgets_s": {s: budgets[s] for s in sections}, "deadline_s": args.deadline_s, "goals": GOALS}
    rec = Recorder(args.out / args.json, meta, t_start + args.deadline_s)
    try:
        rec.data["facts"] = facts(device)
    except Exception:
        rec.data["facts"] = {"error": traceback.format_exc()[-2000:]}
    kernels = kernel_providers(device, providers)
    rec.data["providers"] = {k: {"available": v[0] is not None, "reason": v[1]} for k, v in kernels.items()}
    rec.flush()
    dtypes = [d for d in args.dtypes.split(",") if d]
    runners = {
        "correctness": lambda: run_correctness(rec, kernels, device, dtypes, args.tiny),
        "limits": lambda: run_limits(rec, kernels, device, args.tiny),
        "determinism": lambda: run_determinism(rec, kernels, device, args.tiny),
        "timings": lambda: run_timings(rec, kernels, device, providers, args.tiny),
        "bank": lambda: run_bank(rec, kernels, device, providers, args.tiny),
        "training": lambda: run_training(rec, device, args.tiny),
    }
    for name in sections:
        rec.begin(name, budgets[name])
        try:
            runners[name]()
            if name == "correctness" and args.inject_failure:
                run_failure_probe(rec)
        except Exception:      # a section's own set-up broke: recorded as one case, the next section runs
            rec.data["cases"].append({"section": name, "name": "section", "status": "error",
                                      "detail": "the section stopped", "traceback": traceback.format_exc()[-6000:]})
        rec.end()
    rec.data["seconds"] = round(time.monotonic() - t_start, 2)
    rec.flush()
    counts = {k: sum(c["status"] == k for c in rec.data["cases"]) for k in ("pass", "fail", "error", "skipped")}
    print(f"{args.out / args.json}: {counts} in {rec.data['seconds']} s", flush=True)
    return rec.data


if __name__ == "__main__":
    result = main()
    sys.exit(1 if isinstance(result, dict) and any(c["status"] in ("fail", "error") for c in result["cases"]) else 0)
