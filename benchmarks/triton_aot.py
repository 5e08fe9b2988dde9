"""Ahead-of-time compile every Triton kernel of kernels/ for sm_90 on a machine without a GPU and report, per
kernel and configuration: registers, spills, shared memory and the vector widths of global loads and stores.

    env -u TRITON_INTERPRET .venv/bin/python benchmarks/triton_aot.py [--out FILE.md] [--only SUBSTRING]

The launches are the real ones: each wrapper of kernels/ is called on CPU tensors of a representative shape with
the launch intercepted, so the signature, the specialisation (16-byte divisible pointers and integers, integer
arguments equal to 1 as constants, as the Triton runtime does on a GPU), the constexprs and num_warps are what a
GPU run would compile. Then ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` builds the
PTX and the cubin; registers, spills and stack come from ``ptxas -v`` on that PTX (Triton's own ptxas and flags),
shared memory from the compiled metadata, and the access widths are counted in the PTX (``ld.global.v4``,
``.v2``, scalar; ``st.global`` likewise).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this script compiles for the GPU (env -u TRITON_INTERPRET ...)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, native_specialize_impl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from polarprune_cuda.kernels import binary_gate as BG  # noqa: E402
from polarprune_cuda.kernels import channel_gate as CG  # noqa: E402
from polarprune_cuda.kernels import gate_bank as GB  # noqa: E402
from polarprune_cuda.kernels import gate_penalty as GP  # noqa: E402
from polarprune_cuda.kernels import gated_affine as GA  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


@contextlib.contextmanager
def captured_launches():
    """Every ``kernel[grid](...)`` inside records (fn, grid, args, kwargs) instead of launching."""
    launches = []
    original = JITFunction.__getitem__

    def getitem(self, grid):
        return lambda *args, **kwargs: launches.append((self, grid, args, kwargs))

    JITFunction.__getitem__ = getitem
    try:
        yield launches
    finally:
        JITFunction.__getitem__ = original


def compile_launch(fn, args, kwargs):
    """triton.compile for sm_90 with the runtime's specialisation of these arguments."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(fn.arg_names, args))
    values.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name, value = param.name, values[param.name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        if ty == "constexpr":
            signature[name], constexprs[name] = "constexpr", spec
            continue
        signature[name] = ty
        if spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options)


@functools.lru_cache(maxsize=None)
def ptxas_report(ptx: str) -> dict:
    """Registers, spill bytes and stack of the PTX, from Triton's ptxas with Triton's flags (-v); once per PTX
    (configurations that specialise alike compile to the same PTX)."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run([get_ptxas(TARGET.arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              "--gpu-name=sm_90a", str(src), "-o", str(Path(d) / "k.o")],
                             capture_output=True, text=True, check=True).stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else 0  # noqa: E731
    return {"regs": num(r"Used (\d+) registers"), "spill_st": num(r"(\d+) bytes spill stores"),
            "spill_ld": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


def access_widths(ptx: str, op: str) -> str:
    """'v4:a v2:b s:c' counts of global ``op`` (ld or st) instructions in the PTX by vector width."""
    counts = {"v4": 0, "v2": 0, "s": 0}
    for m in re.finditer(rf"\b{op}\.global((?:\.[\w:]+)*)", ptx):
        mods = m.group(1).split(".")
        counts["v4" if "v4" in mods else "v2" if "v2" in mods else "s"] += 1
    return " ".join(f"{k}:{v}" for k, v in counts.items())


def rand(*shape, dtype=torch.float32, channels_last=False):
    t = torch.randn(*shape).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def bank_model(n, segments):
    """Cost-model tensors of ``segments`` contiguous segments over n gates with a pair per neighbour."""
    from polarprune_cuda.ops.cost import CostModel
    if segments == 0:
        return CostModel.channels(n).op_args("cpu")
    sizes = [n // segments + (1 if i < n % segments else 0) for i in range(segments)]
    pairs = {(i, i + 1): 1.0 for i in range(segments - 1)}
    return CostModel.from_terms(n, sizes, {i: 1.0 for i in range(segments)}, pairs, const=1.0).op_args("cpu")


def configurations():
    """(label, thunk calling a wrapper) for every kernel of kernels/ in representative configurations."""
    out = []
    for dt in (torch.float32, torch.float64):
        out.append((f"binary_gate fwd {dt}", lambda dt=dt: BG.binary_gate(rand(26560, dtype=dt), "identity", 1.0)))
        out.append((f"binary_gate bwd sigmoid {dt}", lambda dt=dt: BG.binary_gate_backward(
            rand(26560, dtype=dt), rand(26560, dtype=dt), "sigmoid", 0.7)))
        out.append((f"gate_bank bwd sigmoid {dt}", lambda dt=dt: GB.gate_bank_backward(
            *(rand(26560, dtype=dt) for _ in range(1)), rand(4, dtype=dt), rand(26560, dtype=dt),
            rand(26560, dtype=dt), rand(26560, dtype=dt), "sigmoid", 0.7)))
    for dt in (torch.float32, torch.bfloat16):
        out.append((f"gated_affine fwd {dt}", lambda dt=dt: GA.gated_affine(*(rand(512, dtype=dt) for _ in range(3)))))
        out.append((f"gated_affine bwd {dt}", lambda dt=dt: GA.gated_affine_backward(
            *(rand(512, dtype=dt) for _ in range(5)))))
    shapes = [("NCHW 8x64x56x56", (8, 64, 56, 56), False), ("channels_last 8x64x56x56", (8, 64, 56, 56), True),
              ("channels_last 8x256x7x7 (HW=49, masked)", (8, 256, 7, 7), True)]
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        for label, shape, cl in shapes:
            out.append((f"channel_gate fwd {label} {dt}", lambda s=shape, cl=cl, dt=dt: CG.channel_gate(
                rand(*s, dtype=dt, channels_last=cl), rand(s[1], dtype=dt))))
            out.append((f"channel_gate bwd {label} {dt}", lambda s=shape, cl=cl, dt=dt: CG.channel_gate_backward(
                rand(*s, dtype=dt, channels_last=cl), rand(*s, dtype=dt, channels_last=cl), rand(s[1], dtype=dt))))
    for dt in (torch.float32, torch.float64):
        for n, segments, label in [(26560, 0, "no pairs"), (26560, 53, "pairs, 53 segments (KPAD=64)"),
                                   (65536, 4096, "pairs, 4096 segments (KPAD=4096)")]:
            for form in ("zhuang", "bimodal"):
                out.append((f"gate_penalty {label} {form} {dt}", lambda n=n, k=segments, dt=dt, form=form:
                            GP.gate_penalty(rand(n, dtype=dt), *bank_model(n, k), 1.0, 0.5, 1.0, 0.1, form, 1.0)))
            out.append((f"gate_bank {label} zhuang {dt}", lambda n=n, k=segments, dt=dt: GB.gate_bank(
                rand(n, dtype=dt), "sigmoid", *bank_model(n, k), 1.0, 0.5, "zhuang", 1.0)))
    return out


#: sizes at which the runtime specialises differently: an integer argument equal to 1 becomes a constexpr (no
#: .to(), no tensor methods), 16 and its multiples are marked divisible by 16, 2 and 17 are neither
EDGE_SIZES = (1, 2, 16, 17)


def edge_configurations(dtypes=(torch.float32, torch.float64)):
    """(label, thunk) of every wrapper at the edge sizes: one gate, one channel, a 1x1 plane, a single row."""
    out = []
    for dt in dtypes:
        for n in EDGE_SIZES:
            out.append((f"edge binary_gate fwd n={n} {dt}", lambda n=n, dt=dt: BG.binary_gate(
                rand(n, dtype=dt), "identity", 1.0)))
            out.append((f"edge binary_gate bwd n={n} {dt}", lambda n=n, dt=dt: BG.binary_gate_backward(
                rand(n, dtype=dt), rand(n, dtype=dt), "sigmoid", 0.7)))
            out.append((f"edge gate_bank bwd n={n} {dt}", lambda n=n, dt=dt: GB.gate_bank_backward(
                rand(n, dtype=dt), rand(4, dtype=dt), rand(n, dtype=dt), rand(n, dtype=dt), rand(n, dtype=dt),
                "sigmoid", 0.7)))
            out.append((f"edge gated_affine n={n} {dt}", lambda n=n, dt=dt: (
                GA.gated_affine(*(rand(n, dtype=dt) for _ in range(3))),
                GA.gated_affine_backward(*(rand(n, dtype=dt) for _ in range(5))))))
            segment_counts = (0, 1) if n == 1 else (0, 1, 2)
            for k in segment_counts:
                for form in ("zhuang", "bimodal"):
                    out.append((f"edge gate_penalty n={n} segments={k} {form} {dt}", lambda n=n, k=k, dt=dt, form=form:
                                GP.gate_penalty(rand(n, dtype=dt), *bank_model(n, k), 1.0, 0.5, 1.0, 0.1, form, 1.0)))
                out.append((f"edge gate_bank n={n} segments={k} {dt}", lambda n=n, k=k, dt=dt: GB.gate_bank(
                    rand(n, dtype=dt), "sigmoid", *bank_model(n, k), 1.0, 0.5, "zhuang", 1.0)))
        for shape in ((1, 1, 1, 1), (1, 1, 1, 17), (2, 16, 1, 1), (1, 17, 4, 4), (16, 1), (1, 16)):
            for cl in ((False, True) if len(shape) == 4 else (False,)):
                layout = "channels_last" if cl else "NCHW"
                out.append((f"edge channel_gate {shape} {layout} {dt}", lambda s=shape, cl=cl, dt=dt: (
                    CG.channel_gate(rand(*s, dtype=dt, channels_last=cl), rand(s[1], dtype=dt)),
                    CG.channel_gate_backward(rand(*s, dtype=dt, channels_last=cl),
                                             rand(*s, dtype=dt, channels_last=cl), rand(s[1], dtype=dt)))))
    return out


def compile_all(configs, only=""):
    """Compile every launch of ``configs`` (labels matching ``only``): (records, failures). A launch that does
    not compile is a failure with the compiler's message, not an exception: every configuration is tried."""
    records, failures = [], []
    for label, call in configs:
        if not re.search(only, label):
            continue
        with captured_launches() as launches:
            call()
        for fn, grid, a, kw in launches:
            try:
                compiled = compile_launch(fn, a, dict(kw))
            except Exception as exc:  # a CompilationError names the kernel line
                failures.append(dict(label=label, kernel=fn.__name__, error=f"{type(exc).__name__}: {exc}"[-1500:]))
                continue
            ptx = compiled.asm["ptx"]
            records.append(dict(label=label, kernel=fn.__name__, num_warps=compiled.metadata.num_warps,
                                shared=compiled.metadata.shared, ld=access_widths(ptx, "ld"),
                                st=access_widths(ptx, "st"), **ptxas_report(ptx)))
    return records, failures


COLUMNS = ("label", "kernel", "num_warps", "regs", "spill", "stack", "shared", "ld", "st")
HEADER = ("configuration", "kernel", "warps", "registers", "spill st/ld (B)", "stack (B)", "shared (B)",
          "global loads (PTX)", "global stores (PTX)")


def _cells(r):
    return [str(r["spill_st"]) + "/" + str(r["spill_ld"]) if c == "spill" else str(r[c]) for c in COLUMNS]


def table(records) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return lines + ["| " + " | ".join(_cells(r)) + " |" for r in records]


def side_by_side(a: dict, b: dict) -> list[str]:
    """Rows of two saved runs (--save) side by side: 'A / B' where they differ, one value where they agree."""
    va, vb = a["versions"]["triton"], b["versions"]["triton"]
    key = lambda r: (r["label"], r["kernel"])  # noqa: E731
    rb = {key(r): r for r in b["records"]}
    lines = [f"Cells read `triton {va} / triton {vb}` where the two differ.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    differ = 0
    for r in a["records"]:
        other = rb.get(key(r))
        ca = _cells(r)
        cb = _cells(other) if other else ["(absent)"] * len(ca)
        cells = ca[:2] + [x if x == y else f"**{x} / {y}**" for x, y in zip(ca[2:], cb[2:])]
        differ += cells != ca
        lines.append("| " + " | ".join(cells) + " |")
    fails = [f"- triton {v}: {f['label']} ({f['kernel']}): {f['error'].splitlines()[-1][:300]}"
             for v, run in ((va, a), (vb, b)) for f in run["failures"]]
    return [f"{differ} of {len(a['records'])} rows differ.", ""] + lines + (
        ["", "Launches that did not compile:", "", *fails] if fails else ["", "Every launch compiled on both."])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the table (markdown) here")
    parser.add_argument("--only", default="", help="only configurations whose label matches this regular expression")
    parser.add_argument("--set", choices=("representative", "edge", "all"), default="all",
                        help="representative shapes, the edge sizes (n=1, 16, 17, one channel, 1x1 planes), or both")
    parser.add_argument("--json", action="store_true", help="print the rows and failures as one JSON object")
    parser.add_argument("--save", type=Path, help="write the rows, failures and versions as JSON (for --compare)")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("A.json", "B.json"),
                        help="no compiling: write two --save files side by side to --out")
    args = parser.parse_args(argv)
    today = datetime.date.today()
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        text = "\n".join(side_by_side(a, b))
        if args.out:
            args.out.write_text(
                f"# Triton kernels AOT-compiled for sm_90: triton {a['versions']['triton']} and "
                f"{b['versions']['triton']}\n\n"
                f"Commands: `benchmarks/triton_aot.py --save` in each environment (A: {a['versions']}; B: "
                f"{b['versions']}), then `benchmarks/triton_aot.py --compare A.json B.json --out {args.out}`. "
                f"No GPU: target GPUTarget('cuda', 90, 32), the runtime's specialisation of the real arguments, "
                f"ptxas of each triton wheel. {today}.\n\n" + text + "\n")
        print(text)
        return a, b
    configs = []
    if args.set in ("representative", "all"):
        configs += configurations()
    if args.set in ("edge", "all"):
        configs += edge_configurations()
    records, failures = compile_all(configs, args.only)
    versions = {"triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    if args.save:
        args.save.write_text(json.dumps({"versions": versions, "records": records, "failures": failures}, indent=1))
    if args.json:
        print(json.dumps({"records": records, "failures": failures}))
    else:
        print("\n".join(table(records)))
        for f in failures:
            print(f"DID NOT COMPILE: {f['label']} ({f['kernel']}): {f['error']}", file=sys.stderr)
    if args.out:
        args.out.write_text(
            f"# Triton kernels AOT-compiled for sm_90\n\n"
            f"Command: `env -u TRITON_INTERPRET python benchmarks/triton_aot.py --set {args.set} --out {args.out}`  \n"
            f"triton {triton.__version__}, torch {torch.__version__}, {today}, no GPU "
            f"(target GPUTarget('cuda', 90, 32), ptxas of the triton wheel).\n\n" + "\n".join(table(records)) + "\n"
            + ("\nDid not compile:\n\n" + "\n".join(f"- {f['label']} ({f['kernel']}): {f['error']}" for f in failures)
               + "\n" if failures else ""))
    return records, failures


if __name__ == "__main__":
    _, fails = main()
    sys.exit(1 if isinstance(fails, list) and fails else 0)
