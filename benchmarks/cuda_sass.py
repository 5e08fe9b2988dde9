"""What the CUDA kernels compile to, without a GPU: registers, spills and shared memory (ptxas -v), and per
kernel the widths of its global loads and stores and its subroutine calls (64-bit integer division is a
call on sm_90) counted in the SASS (cuobjdump, the copy Triton's package carries).

    .venv/bin/python benchmarks/cuda_sass.py                          # csrc/ as it is now
    .venv/bin/python benchmarks/cuda_sass.py --before 4aff1fa --out benchmarks/results/cuda-sass-sm90.md
    .venv/bin/python benchmarks/cuda_sass.py --binary polarprune_cuda/_C.*.so     # the built extension

With ``--before REV`` the same report is made for csrc/ at that git revision, side by side.
"""
from __future__ import annotations

import argparse
import datetime
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ("channel_gate.cu", "gate_penalty.cu", "binary_gate.cu", "gate_bank.cu", "gated_affine.cu")


def _tool(name: str) -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    found = shutil.which(name) or (str(bundled) if bundled.exists() else None)
    if not found:
        raise SystemExit(f"{name} not found (install triton, or put the CUDA toolkit's bin on PATH)")
    return found


def _nvcc_flags(arch: str, csrc: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    incs = [f"-I{p}" for p in include_paths("cuda")] + [f"-I{csrc}"]
    py = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['include'])"],
                        capture_output=True, text=True).stdout.strip()
    return [*incs, f"-I{py}", "-O3", "--expt-relaxed-constexpr", "-std=c++20", "-Xptxas=-v",
            "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
            f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin"]


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = {}
    for mangled, full in zip(names, out):
        full = re.sub(r"polarprune::\(anonymous namespace\)::", "", full)
        full = re.sub(r"c10::(BFloat16|Half)", r"\1", full)
        short[mangled] = re.sub(r"\(.*\)$", "", full)
    return short


def _sass_counts(sass: str) -> dict[str, Counter]:
    """Per function of a SASS listing: global loads and stores by width, subroutine calls, instructions."""
    counts: dict[str, Counter] = {}
    func = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            func = counts.setdefault(m[1], Counter())
            continue
        if func is None:
            continue
        m = re.search(r"\b(LDG|STG)(\.E)?((?:\.\w+)*)", line)
        if m:
            mods = m[3]
            width = next((w for w in ("128", "64", "U16", "S16", "U8") if f".{w}" in mods), "32")
            func[f"{m[1]}.{width}"] += 1
        if re.search(r"\bCALL\.(REL|ABS)", line):
            func["CALL"] += 1
        if re.search(r"/\*[0-9a-f]{4}\*/", line):
            func["instructions"] += 1
    return counts


def _row(file: str, kernel: str, info: dict, c: Counter) -> dict:
    return {"file": file, "kernel": kernel, **info,
            "ldg": {k.split(".", 1)[1]: v for k, v in c.items() if k.startswith("LDG")},
            "stg": {k.split(".", 1)[1]: v for k, v in c.items() if k.startswith("STG")},
            "calls": c["CALL"], "instructions": c["instructions"]}


def report_binary(binary: Path, arch: str = "90") -> list[dict]:
    """The same report read from a built extension (no compile): registers, stack frame (spills live in it) and
    shared memory from ``cuobjdump -res-usage``, widths and calls from its SASS. Empty if it holds no sm_<arch>
    code."""
    cuobjdump = _tool("cuobjdump")
    res = subprocess.run([cuobjdump, "-res-usage", "-arch", f"sm_{arch}", str(binary)], capture_output=True,
                         text=True).stdout
    usage, current = {}, None
    for line in res.splitlines():
        m = re.search(r"Function (\w+):", line)
        if m:
            current = m[1]
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and current:
            usage[current] = {"regs": int(m[1]), "spill": int(m[2]) + int(m[4]), "smem": int(m[3])}
    counts = _sass_counts(subprocess.run([cuobjdump, "-sass", "-arch", f"sm_{arch}", str(binary)],
                                         capture_output=True, text=True).stdout)
    names = _demangle(list(usage))
    rows = []
    for mangled, info in usage.items():
        m = re.search(r"_\d+_(\w+?)_cu_[0-9a-f]+", mangled)
        rows.append(_row(f"{m[1]}.cu" if m else "?", names[mangled], info, counts.get(mangled, Counter())))
    return rows


def report(csrc: Path, arch: str, files=FILES) -> list[dict]:
    nvcc, cuobjdump = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc", _tool("cuobjdump")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in files:
            src = csrc / name
            if not src.exists():
                continue
            cubin = Path(tmp) / (src.stem + ".cubin")
            res = subprocess.run([nvcc, *_nvcc_flags(arch, csrc), str(src), "-o", str(cubin)],
                                 capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"nvcc failed on {src}:\n{res.stderr[-4000:]}")
            ptxas = {}
            current = None
            for line in res.stderr.splitlines():
                m = re.search(r"Compiling entry function '(\w+)'", line)
                if m:
                    current = ptxas.setdefault(m[1], {})
                    continue
                if current is None:
                    continue
                m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
                if m:
                    current["spill"] = int(m[1]) + int(m[2])
                m = re.search(r"Used (\d+) registers", line)
                if m:
                    current["regs"] = int(m[1])
                    m2 = re.search(r"(\d+) bytes smem", line)
                    current["smem"] = int(m2[1]) if m2 else 0
            counts = _sass_counts(subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True,
                                                 text=True).stdout)
            names = _demangle(list(ptxas))
            for mangled, info in ptxas.items():
                rows.append(_row(name, names[mangled], info, counts.get(mangled, Counter())))
    return rows


def _widths(d: dict) -> str:
    order = ("128", "64", "32", "U16", "S16", "U8")
    return " ".join(f"{w}:{d[w]}" for w in order if d.get(w)) or "-"


def markdown(sections: dict[str, list[dict]], arch: str, command: str) -> str:
    lines = [f"# CUDA kernels compiled for sm_{arch}: registers, spills, global access widths, calls", "",
             f"`{command}` on {datetime.date.today()} (no GPU needed). Widths: SASS LDG/STG by bits (128 = 16-byte "
             "vector, U16 = one half/bfloat16); calls: subroutine calls in the SASS (64-bit integer division and "
             "remainder are calls on sm_90).", ""]
    for title, rows in sections.items():
        lines += [f"## {title}", "", "| file | kernel | regs | spill B | smem B | LDG | STG | calls | instr |",
                  "|---|---|---:|---:|---:|---|---|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['file']} | `{r['kernel']}` | {r.get('regs', '?')} | {r.get('spill', 0)} | "
                         f"{r.get('smem', 0)} | {_widths(r['ldg'])} | {_widths(r['stg'])} | {r['calls']} | "
                         f"{r['instructions']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="90")
    ap.add_argument("--before", help="a git revision: report csrc/ there too, side by side")
    ap.add_argument("--out", type=Path, help="write the Markdown report here (default: print it)")
    ap.add_argument("--binary", type=Path, help="read a built extension (e.g. polarprune_cuda/_C*.so) instead of "
                    "compiling csrc/: registers, stack and shared memory from cuobjdump -res-usage")
    ap.add_argument("--files", nargs="+", default=list(FILES), help=f"csrc files to compile (default: {FILES})")
    args = ap.parse_args(argv)
    sections = {}
    if args.before:
        with tempfile.TemporaryDirectory() as tmp:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "csrc"], capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            sections[f"before: csrc/ at {args.before}"] = report(Path(tmp) / "csrc", args.arch, args.files)
    if args.binary:
        sections[f"built: {args.binary.name}"] = report_binary(args.binary, args.arch)
    else:
        sections["now: csrc/"] = report(ROOT / "csrc", args.arch, args.files)
    text = markdown(sections, args.arch, "python benchmarks/cuda_sass.py " + " ".join(argv or sys.argv[1:]))
    if args.out:
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
