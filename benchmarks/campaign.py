"""The GPU campaign's summary: what benchmarks/gpu_first.sh brought back, against the goals.

    python3 benchmarks/campaign.py OUT        # writes OUT/summary.md and prints it
    python3 benchmarks/campaign.py --merge OUT/bench.json PART.json ...   # the suites' JSON files into one

Everything measured comes from the project's own harnesses: the GPU tests (``pytest -m gpu``, junit XML in
tests.xml, the summary line in tests.txt), the pytest-benchmark suites (bench.json), compute-sanitizer over a
selection of the GPU tests (sanitizer.txt), the build log (ptxas' report), and, in a dry run, the AOT compile of
the Triton kernels (aot.json). This file only reads them: each goal is stated as met, NOT met or not measured
(with the reason), and a step that was cut or failed says so instead of a verdict it did not reach.
"""
from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

#: the goals of the campaign (issue "GPU campaign"): the one place they are stated
GOALS = {
    "channel_gate_backward_of_copy": 0.85,      # channel_gate backward bandwidth / a device copy's, at least
    "channel_gate_backward_vs_compile": 1.25,   # torch.compile of the reference / the best kernel, at least
    "bank_us_per_direction": 15.0,              # ResNet-50 gate bank + penalty, GPU time per direction, at most
    "training_ratio": 1.02,                     # gated / unpruned ResNet-50 training step, at most
}
KERNEL_PROVIDERS = ("cuda", "triton")

_SUMMARY = re.compile(r"^=+ (.*\b(?:passed|failed|error|errors|skipped|deselected|no tests ran)\b.*) =+$")


def pytest_verdict(text: str) -> str | None:
    """pytest's closing summary line ('3 failed, 120 passed, 2 skipped in 61.2s'), never a progress line;
    None when the run ended without one (cut by its limit, or crashed)."""
    found = [m.group(1) for line in text.splitlines() if (m := _SUMMARY.match(line.strip()))]
    return found[-1] if found else None


def verdict_counts(verdict: str | None) -> dict:
    """{'passed': 120, 'failed': 3, ...} from a pytest summary line."""
    counts = {}
    for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)",
                                   verdict or ""):
        counts["error" if word.startswith("error") else word] = int(number)
    return counts


def junit(path: Path) -> dict | None:
    """Counts and the failing tests (name: message) of a junit XML, or None when there is none."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    cases = list(root.iter("testcase"))
    out = {"tests": len(cases), "failed": [], "skipped": 0, "skip_reasons": {}}
    for c in cases:
        name = f"{c.get('classname', '')}::{c.get('name', '')}"
        bad = c.find("failure") if c.find("failure") is not None else c.find("error")
        if bad is not None:
            out["failed"].append(f"{name}: {(bad.get('message') or '').splitlines()[0][:240] if bad.get('message') else ''}")
        elif c.find("skipped") is not None:
            out["skipped"] += 1
            skip = c.find("skipped")
            why = skip.get("message") or "no reason given"
            if why == "collection skipped" and "Skipped: " in (skip.text or ""):   # a module skipped whole
                why = f"{c.get('name')} (whole module): " + skip.text.split("Skipped: ", 1)[1].rstrip("\")'\"")
            why = why.splitlines()[0][:300]
            out["skip_reasons"][why] = out["skip_reasons"].get(why, 0) + 1
    out["passed"] = out["tests"] - len(out["failed"]) - out["skipped"]
    return out


def bench_rows(path: Path) -> list[dict]:
    """pytest-benchmark's rows: extra_info plus ``wall_us``/``gpu_us`` per call (from the suites' RoundTimer, or
    the median round over calls_per_round)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    rows = []
    for b in data.get("benchmarks", []):
        x = dict(b.get("extra_info", {}))
        calls = x.get("calls_per_round", 1) or 1
        x.setdefault("wall_us", b["stats"]["median"] * 1e6 / calls)
        x["name"] = b.get("name")
        rows.append(x)
    return rows


def _us(row: dict) -> float:
    """The GPU time of a row where measured, else its wall time."""
    return row["gpu_us"] if row.get("gpu_us") is not None else row["wall_us"]


def goal_lines(rows: list[dict]) -> list[str]:
    lines = []
    kern = [r for r in rows if r.get("kind") == "kernel" and r.get("op") == "channel_gate" and r.get("pass_") == "backward"]
    copy = next((r for r in kern if r.get("provider") == "copy"), None)
    best = min((r for r in kern if r.get("provider") in KERNEL_PROVIDERS), key=_us, default=None)
    if best is None:
        lines.append("- channel_gate backward (ResNet-50 activations, bf16): **not measured** (no CUDA or Triton row)")
    else:
        text = f"- channel_gate backward {best['case']}: best {best['provider']} {_us(best):.1f} us"
        if copy:
            frac = _us(copy) / _us(best)       # both move floor_bytes
            ok = frac >= GOALS["channel_gate_backward_of_copy"]
            text += (f" = {frac:.0%} of a copy of the same bytes ({_us(copy):.1f} us; goal >= "
                     f"{GOALS['channel_gate_backward_of_copy']:.0%}: {'met' if ok else '**NOT met**'})")
        else:
            text += "; vs copy: **not measured**"
        comp = next((r for r in kern if r.get("provider") == "compile"), None)
        if comp:
            speed = _us(comp) / _us(best)
            ok = speed >= GOALS["channel_gate_backward_vs_compile"]
            text += (f"; {speed:.2f}x torch.compile's {_us(comp):.1f} us (goal >= "
                     f"{GOALS['channel_gate_backward_vs_compile']}x: {'met' if ok else '**NOT met**'})")
        else:
            text += "; vs torch.compile: **not measured**"
        others = [f"{r['provider']} {_us(r):.1f} us" for r in kern if r.get("provider") in KERNEL_PROVIDERS and r is not best]
        lines.append(text + (f"; {', '.join(others)}" if others else ""))
    bank = {(r["backend"], r["direction"]): r for r in rows if r.get("kind") == "bank"}
    goal = GOALS["bank_us_per_direction"]
    measured = False
    for backend in ("cuda", "triton", "torch"):
        f, b = bank.get((backend, "forward")), bank.get((backend, "backward"))
        if not (f and b):
            continue
        measured = True
        ok = max(_us(f), _us(b)) <= goal
        wall = f"; wall {f['wall_us']:.1f} / {b['wall_us']:.1f} us back to back"
        lines.append(f"- ResNet-50 gate bank + MACs penalty ({backend}): forward {_us(f):.1f} us, backward "
                     f"{_us(b):.1f} us GPU time (goal <= {goal:g} us per direction: {'met' if ok else '**NOT met**'})"
                     + wall)
    if not measured:
        lines.append("- ResNet-50 gate bank + penalty: **not measured** (no bank rows)")
    train = next((r for r in rows if r.get("kind") == "training-interleaved" and r.get("model") == "resnet50"), None)
    if train:
        v, s = train["variants"], train["setting"]
        ratio = v["polarprune"]["median_ms"] / v["unpruned"]["median_ms"]
        naive = (f"; naive gating {v['naive']['median_ms'] / v['unpruned']['median_ms']:.3f}x" if "naive" in v else "")
        lines.append(f"- ResNet-50 training step ({s['dtype']}, batch {s['batch']}, "
                     f"{'channels_last' if s['channels_last'] else 'NCHW'}): gated {v['polarprune']['median_ms']:.2f} ms "
                     f"vs unpruned {v['unpruned']['median_ms']:.2f} ms = {ratio:.3f}x (goal <= {GOALS['training_ratio']}x: "
                     f"{'met' if ratio <= GOALS['training_ratio'] else '**NOT met**'}){naive}")
    else:
        lines.append("- ResNet-50 training step gated vs unpruned: **not measured** (no interleaved training row)")
    return lines


def kernel_table(rows: list[dict]) -> list[str]:
    kern = [r for r in rows if r.get("kind") == "kernel"]
    if not kern:
        return []
    copies = {(r["op"], r["pass_"]): r for r in kern if r.get("provider") == "copy"}
    out = ["| op | pass | case | provider | GPU us | wall us | GB/s | of copy |", "|---|---|---|---|---:|---:|---:|---:|"]
    for r in sorted(kern, key=lambda r: (r["op"], r["pass_"], r["provider"])):
        floor, copy = r.get("floor_bytes"), copies.get((r["op"], r["pass_"]))
        gbps = f"{floor / (_us(r) * 1e-6) / 1e9:.0f}" if floor else ""
        of = f"{_us(copy) / _us(r):.0%}" if copy and floor else ""
        gpu = f"{r['gpu_us']:.1f}" if r.get("gpu_us") is not None else ""
        out.append(f"| {r['op']} | {r['pass_']} | {r['case']} | {r['provider']} | {gpu} | {r['wall_us']:.1f} | {gbps} | {of} |")
    return out


def step_lines(log: str) -> list[str]:
    steps = re.findall(r"STEP (\S+) status=(\S+) seconds=(\d+) limit=(\d+)", log)
    if not steps:
        return []
    return ["| step | status | seconds | limit s |", "|---|---|---:|---:|"] + [
        f"| {n} | {s} | {sec} | {lim} |" for n, s, sec, lim in steps]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def tests_line(out: Path, name: str, what: str) -> str:
    text = _read(out / f"{name}.txt")
    xml = junit(out / f"{name}.xml")
    if text is None and xml is None:
        return f"- {what}: **not run** (no {name}.txt)"
    verdict = pytest_verdict(text or "")
    line = f"- {what}: " + (verdict if verdict else f"**no pytest summary line** (cut or crashed: see {name}.txt)")
    if xml:
        line += f" (junit: {xml['tests']} cases, {xml['passed']} passed, {len(xml['failed'])} failed, {xml['skipped']} skipped)"
        if xml["failed"]:
            line += "\n" + "\n".join(f"  - {f}" for f in xml["failed"][:40])
        reasons = sorted(xml["skip_reasons"].items(), key=lambda kv: -kv[1])
        if reasons:
            line += "\n  skipped, by reason:\n" + "\n".join(f"  - {n}: {why}" for why, n in reasons[:8])
    return line


def sanitizer_line(out: Path) -> str:
    text = _read(out / "sanitizer.txt")
    if text is None:
        return "- compute-sanitizer memcheck: **not run** (no sanitizer.txt)"
    errors = re.findall(r"ERROR SUMMARY: (\d+) errors?", text)
    verdict = pytest_verdict(text)
    ran = sum(v for k, v in verdict_counts(verdict).items() if k in ("passed", "failed"))
    first = text.strip().splitlines()[0] if text.strip() else "empty sanitizer.txt"
    if "not found" in first:
        return f"- compute-sanitizer memcheck: **not run** ({first})"
    if ran == 0:
        return (f"- compute-sanitizer memcheck: **no case ran** ({verdict or 'no pytest summary line'}): it checked "
                f"nothing, whatever its error count says")
    summary = f"{errors[-1]} errors" if errors else "no ERROR SUMMARY line (see sanitizer.txt)"
    return (f"- compute-sanitizer memcheck (caching allocator off): {summary} over {ran} test cases that ran "
            f"({verdict})")


def build_line(out: Path) -> str:
    text = _read(out / "build.log")
    if text is None:
        return "- build: no build.log"
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", text)]
    spills = [s for s in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text) if s != ("0", "0")]
    built = "the extension built" if "FALLBACK-BUILD" not in text else "pip install -e failed: fallback build_ext"
    return (f"- build: {built}; ptxas: {len(regs)} kernels reported, registers max {max(regs) if regs else '?'}, "
            f"{len(spills)} with spills" + (f" {spills[:5]}" if spills else ""))


def aot_lines(out: Path) -> list[str]:
    try:
        data = json.loads((out / "aot.json").read_text())
    except (OSError, ValueError):
        return []
    fails = data.get("failures", [])
    spills = [r for r in data.get("records", []) if r.get("spill_st") or r.get("spill_ld")]
    lines = [f"- Triton AOT for sm_90 (triton {data.get('versions', {}).get('triton', '?')}, the runtime's "
             f"specialisation): {len(data.get('records', []))} launches compiled, {len(fails)} did not, "
             f"{len(spills)} spill"]
    lines += [f"  - did not compile: {f['label']} ({f['kernel']}): {f['error'].splitlines()[-1][:240]}" for f in fails]
    lines += [f"  - spills: {r['label']} ({r['kernel']}): {r['spill_st']}/{r['spill_ld']} B" for r in spills[:10]]
    return lines


def summary(out: Path) -> str:
    log = _read(out / "campaign.log") or ""
    dry = "DRY RUN" in log
    facts = [ln for ln in log.splitlines() if re.match(r"^(device|torch|triton|python|pip|setuptools|ninja|nvcc|"
                                                         r"NVIDIA|name,|xdist|pytest_|compute-sanitizer|Cuda compilation)", ln.strip())]
    lines = ["# GPU campaign summary" + (" (dry run on a CPU machine)" if dry else ""), ""]
    if dry:
        lines += ["A dry run: the GPU image's versions on a machine without a GPU. The build, the AOT compile of the "
                  "Triton kernels and the tests (on the CPU) ran; the GPU goals are not measured by a dry run.", ""]
    if facts:
        lines += ["```", *facts[:16], "```", ""]
    steps = step_lines(log)
    if steps:
        lines += ["## Steps", "", *steps, ""]
    rows = bench_rows(out / "bench.json")
    if not dry:
        lines += ["## Goals", "", *goal_lines(rows), ""]
    lines += ["## Tests, sanitizer, build", "",
              tests_line(out, "tests", "tests (pytest -m gpu)" if not dry else "tests/ops on the CPU")]
    if not dry:
        lines += [tests_line(out, "bench", "benchmark suites"), sanitizer_line(out)]
    lines += [build_line(out), *aot_lines(out)]
    table = kernel_table(rows)
    if table:
        lines += ["", "## Kernels (GPU time per call by CUDA events, 20 calls a round after a read-only L2 flush; "
                      "copy = a device copy of the bytes the op must move)", "", *table]
    bank = [r for r in rows if r.get("kind") == "bank"]
    if bank:
        lines += ["", "## ResNet-50 gate bank through the package (autograd op)", "",
                  "| backend | direction | GPU us | wall us (back to back) |", "|---|---|---:|---:|"]
        lines += [f"| {r['backend']} | {r['direction']} | {r['gpu_us'] if r.get('gpu_us') is None else round(r['gpu_us'], 1)} "
                  f"| {r['wall_us']:.1f} |" for r in bank]
    return "\n".join(lines) + "\n"


def merge(dest: Path, parts: list[Path]) -> dict:
    """pytest-benchmark JSON files (one per suite run) into one: every benchmark of every readable part, the
    first part's machine and commit info. Unreadable parts (a run cut before it wrote) are skipped."""
    out: dict = {"benchmarks": []}
    for part in parts:
        try:
            data = json.loads(Path(part).read_text())
        except (OSError, ValueError):
            continue
        for key in ("machine_info", "commit_info", "datetime", "version"):
            out.setdefault(key, data.get(key))
        out["benchmarks"] += data.get("benchmarks", [])
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(dest)
    return out


def main(argv=None) -> str | dict:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--merge":
        if len(args) < 2:
            raise SystemExit("usage: python benchmarks/campaign.py --merge DEST.json PART.json ...")
        return merge(Path(args[1]), [Path(a) for a in args[2:]])
    if len(args) != 1:
        raise SystemExit("usage: python benchmarks/campaign.py OUT | --merge DEST.json PART.json ...")
    out = Path(args[0])
    text = summary(out)
    (out / "summary.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
