"""Run the benchmark suites and write the results: JSON, a Markdown table, a PNG plot, the results block of
benchmarks/README.md.

    .venv/bin/python benchmarks/run.py                    # what `make bench` runs (CPU: about 3 minutes)
    .venv/bin/python benchmarks/run.py --out /tmp/res     # results elsewhere (the GPU script does this)
    .venv/bin/python benchmarks/run.py --from-json raw.json   # only summarise an earlier pytest-benchmark JSON

A benchmark that fails does not stop the others or the summary: the results hold what finished, and
the failed tests are listed (``failed`` in the JSON, a "Failed" section in the Markdown and the README
block); the exit status is then 1.

The suites (micro/bench_*.py, pytest-benchmark) run in a child process; their JSON
is then summarised into <out>/<device>-<date>.json, .md and .png, where
<device> is the GPU's or CPU's name. Headline figures are ratios between
variants measured in the same run; absolute times are only meaningful with
the device name beside them. With the default output folder the table
between the bench-table markers of benchmarks/README.md is replaced.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MICRO = HERE / "micro"          # the pytest-benchmark suites, their conftest, common.py and pytest.ini
sys.path.insert(0, str(MICRO))
import common  # noqa: E402
from common import device_slug  # noqa: E402
ROOT = HERE.parent
RESULTS = HERE / "results"
README = ROOT / "benchmarks" / "README.md"   # the page holding the latest results block
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
FORMAT = 1
GOALS = {"training_slowdown": 0.03, "speedup_over_macs_ratio": 0.85}


#: pytest's short test summary lines (-rfE): "FAILED path::test - reason", "ERROR path::test - reason"
_SUMMARY_LINE = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$")


def parse_failed(output: str) -> list[dict]:
    """The failed and broken tests named in pytest's short test summary, in order, once each."""
    failed, seen = [], set()
    for line in output.splitlines():
        m = _SUMMARY_LINE.match(line.strip())
        if m and (m.group(1), m.group(2)) not in seen:
            seen.add((m.group(1), m.group(2)))
            failed.append({"test": m.group(2), "outcome": m.group(1).lower(), "reason": (m.group(3) or "")[:500]})
    return failed


def run_suites(raw_json: Path, pytest_args: list[str], suites: Path = MICRO) -> list[dict]:
    """Run the suites into ``raw_json``; return the tests that failed or broke (never raises for them).

    A pytest run that ends badly without naming a test (collection error, interruption, no test) is
    returned as one entry ``<pytest>`` with the exit code and the last line of its output.
    """
    ini = suites / "pytest.ini" if (suites / "pytest.ini").is_file() else MICRO / "pytest.ini"
    cmd = [sys.executable, "-m", "pytest", str(suites), "-c", str(ini), "-p", "no:cacheprovider", "-rfE",
           "--benchmark-json", str(raw_json), *pytest_args]
    print("+", shlex.join(cmd), flush=True)
    env = os.environ | {"COLUMNS": "1000"}       # wide: pytest cuts the reasons of its summary lines to the terminal
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    rc = proc.wait()
    failed = parse_failed("".join(lines))
    if rc != 0 and not failed:
        last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "no output")
        failed.append({"test": "<pytest>", "outcome": "error", "reason": f"pytest exit code {rc}: {last}"[:500]})
    if failed:
        print(f"\n{len(failed)} benchmark(s) failed; summarising what finished", flush=True)
    return failed


def machine_info(pytest_args: list[str]) -> dict:
    """What micro/conftest.py puts into the JSON, for a run that left none (it broke before the end)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = "--tiny" in pytest_args
    return {"device": common.device_name(device), "device_type": device.type, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "tiny": tiny,
            "settings": {k: v.to_dict() for k, v in common.settings(device, tiny).items()}}


# ----------------------------------------------------------------------------- summarise

def _stats(bench: dict) -> dict:
    calls = bench["extra_info"].get("calls_per_round", 1)
    st = bench["stats"]
    return {"median_ms": st["median"] * 1e3 / calls, "iqr_ms": st["iqr"] * 1e3 / calls,
            "min_ms": st["min"] * 1e3 / calls, "rounds": st["rounds"]}


def _collect(benches: list[dict]):
    """Sort pytest-benchmark's rows by kind: training, inference, kernel rows, interleaved runs, energy."""
    energy_info = None
    training, inference, kernels, interleaved = {}, {}, [], {}
    for b in benches:
        x = b["extra_info"]
        row = _stats(b)
        e = x.get("energy", {"available": False, "reason": "not measured"})
        if e.get("available"):
            energy_info = {"available": True, "source": e["source"], "idle_watts": e["idle_watts"]}
        elif energy_info is None and "energy" in x:
            energy_info = {"available": False, "reason": e.get("reason", "not measured")}
        if x.get("kind") == "training":
            row["energy"] = e
            training.setdefault(x["model"], {})[x["variant"]] = row
        elif x.get("kind") == "inference":
            row.update({k: x[k] for k in ("params", "macs", "dense_params", "dense_macs", "macs_removed")})
            row["energy"] = e
            row["images_per_s"] = x["setting"]["batch"] / (row["median_ms"] / 1e3)
            inference.setdefault(x["model"], {})[x["variant"]] = row
        elif x.get("kind") in ("training-interleaved", "inference-interleaved"):
            interleaved[(x["kind"].split("-")[0], x["model"])] = x["variants"]
        elif x.get("kind") == "kernel":
            row.update({k: x[k] for k in ("op", "provider", "case")}, **{"pass": x["pass_"]})
            kernels.append(row)
    return training, inference, kernels, interleaved, energy_info


def _add_ratios(kind: str, rows: dict, side: dict) -> None:
    """Each variant against unpruned: the interleaved medians are the headline, the separate runs' ratio beside."""
    base, side_base = rows.get("unpruned"), side.get("unpruned")
    for name, r in rows.items():
        if side_base and name in side:
            r["interleaved"] = side[name]
            ratio = side[name]["median_ms"] / side_base["median_ms"]
            r["ratio_source"] = "interleaved"
        elif base:
            ratio = r["median_ms"] / base["median_ms"]
            r["ratio_source"] = "separate runs"
        else:
            continue
        r["separate_ratio"] = r["median_ms"] / base["median_ms"] if base else None
        ekey = "joules_per_call" if kind == "training" else "joules_per_item"
        has_energy = r["energy"].get("available") and base and base["energy"].get("available")
        if kind == "training":
            r["vs_unpruned"] = ratio
            if has_energy:
                r["energy_vs_unpruned"] = r["energy"][ekey] / base["energy"][ekey]
        else:
            r["speedup"] = 1 / ratio
            r["macs_ratio"] = r["dense_macs"] / r["macs"]
            r["speedup_over_macs_ratio"] = r["speedup"] / r["macs_ratio"]
            if has_energy:
                r["energy_ratio"] = base["energy"][ekey] / r["energy"][ekey]


def _add_kernel_speedups(kernels: list[dict]) -> None:
    by_case = {(r["op"], r["pass"], r["case"]): r["median_ms"] for r in kernels if r["provider"] == "eager"}
    for r in kernels:
        eager = by_case.get((r["op"], r["pass"], r["case"]))
        r["speedup_vs_eager"] = eager / r["median_ms"] if eager else None


def summarise(raw: dict, command: str, failed: list[dict] | None = None) -> dict:
    """The result of a run: whatever finished, and ``failed`` (from :func:`run_suites`) listed as such."""
    failed = list(failed or [])
    info = raw["machine_info"].get("polarprune")
    if info is None:
        raise ValueError("the JSON has no polarprune machine info: it was not written by the benchmarks/ suites")
    benches = raw["benchmarks"]
    if not benches and not failed:
        raise ValueError("the JSON holds no benchmark (were they all skipped or disabled?)")
    training, inference, kernels, interleaved, energy_info = _collect(benches)
    for kind, table in (("training", training), ("inference", inference)):
        for model, rows in table.items():
            _add_ratios(kind, rows, interleaved.get((kind, model), {}))
    _add_kernel_speedups(kernels)
    return {
        "format": FORMAT,
        "device": info["device"],
        "device_type": info["device_type"],
        "date": raw.get("datetime", datetime.datetime.now().isoformat())[:10],
        "command": command,
        "torch": info["torch"],
        "threads": info["threads"],
        "tiny": info["tiny"],
        "settings": info["settings"],
        "energy": energy_info or {"available": False, "reason": "not measured"},
        "training": training,
        "inference": inference,
        "kernels": kernels,
        "goals": GOALS,
        "failed": failed,
    }


def _setting_line(s: dict) -> str:
    fmt = "channels_last" if s["channels_last"] else "NCHW"
    return f"batch {s['batch']}, {s['size']}x{s['size']}, {s['dtype']}, {fmt}"


def _j(e: dict, key: str) -> str:
    return f"{e[key]:.4g}" if e.get("available") else "n/a"


def _ratio(r: dict, key: str, invert: bool) -> str:
    if key not in r:
        return "n/a"
    text = f"{r[key]:.3f}x" if not invert else f"{r[key]:.2f}x"
    sep = r.get("separate_ratio")
    if r.get("ratio_source") == "interleaved" and sep:
        text += f" ({(1 / sep if invert else sep):.3f}x)" if not invert else f" ({1 / sep:.2f}x)"
    return text


def tables(res: dict, heading: str = "###") -> str:
    """The headline tables (training and inference), as in the README."""
    out = [f"Device: **{res['device']}** ({res['date']}, torch {res['torch']}, {res['threads']} threads). "
           "Ratios are between variants measured in this run; absolute times hold for this device only."]
    energy = res["energy"]
    out.append("Energy: " + (f"{energy['source']}, idle {energy['idle_watts']:.1f} W (included in the figures)."
                             if energy["available"] else f"unavailable: {energy['reason']}."))
    out += ["", f"{heading} Training step (forward, loss, backward, SGD update)", "",
            "Median ms: the variant's own benchmark. vs unpruned: ratio of medians with the variants interleaved "
            "round by round (the headline); in brackets, the ratio of the separate benchmarks' medians.", "",
            "| model | setting | variant | median ms | vs unpruned | J / step |", "|---|---|---|---:|---:|---:|"]
    for model, rows in res["training"].items():
        for name in ("unpruned", "naive", "polarprune"):
            if name in rows:
                r = rows[name]
                label = {"naive": "naive gating (x * g after every BN, eager)",
                         "polarprune": "polarprune gates (folded into BN, one bank op)"}.get(name, name)
                out.append(f"| {model} | {_setting_line(res['settings'][model])} | {label} | {r['median_ms']:.2f} | "
                           f"{_ratio(r, 'vs_unpruned', False)} | {_j(r['energy'], 'joules_per_call')} |")
    out += ["", f"{heading} Inference: unpruned vs extracted", "",
            "speedup: unpruned median over extracted median with the variants interleaved round by round "
            "(the headline); in brackets, from the separate benchmarks.", "",
            "| model | setting | variant | MACs removed | params | MACs / image | median ms | images/s | speedup | "
            "MACs ratio | speedup / MACs ratio | J / image |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, rows in res["inference"].items():
        for name, r in rows.items():
            out.append(f"| {model} | {_setting_line(res['settings'][model])} | {name} | "
                       f"{100 * r['macs_removed']:.1f}% | {r['params']:,} | {r['macs']:,} | {r['median_ms']:.2f} | "
                       f"{r['images_per_s']:.0f} | {_ratio(r, 'speedup', True)} | "
                       f"{r.get('macs_ratio', float('nan')):.2f}x | "
                       f"{r.get('speedup_over_macs_ratio', float('nan')):.2f} | "
                       f"{_j(r['energy'], 'joules_per_item')} |")
    return "\n".join(out) + "\n"


def goal_lines(res: dict) -> list[str]:
    lines = []
    for model, rows in res["training"].items():
        if "polarprune" in rows and "vs_unpruned" in rows["polarprune"]:
            slow = rows["polarprune"]["vs_unpruned"] - 1
            ok = "met" if slow <= GOALS["training_slowdown"] else "NOT met"
            naive = rows.get("naive", {}).get("vs_unpruned")
            lines.append(f"- {model}: polarprune-gated training step {100 * slow:+.1f}% against unpruned "
                         f"(goal <= +{100 * GOALS['training_slowdown']:.0f}%: {ok})"
                         + (f"; naive gating {100 * (naive - 1):+.1f}%" if naive else ""))
    for model, rows in res["inference"].items():
        r = rows.get("extracted-50")
        if r and "speedup" in r:
            ok = "met" if r["speedup_over_macs_ratio"] >= GOALS["speedup_over_macs_ratio"] else "NOT met"
            line = (f"- {model}: extracted at {100 * r['macs_removed']:.1f}% MACs removed runs {r['speedup']:.2f}x "
                    f"faster for a {r['macs_ratio']:.2f}x MACs ratio = {r['speedup_over_macs_ratio']:.2f} of it "
                    f"(goal >= {GOALS['speedup_over_macs_ratio']}: {ok})")
            if "energy_ratio" in r:
                line += f"; energy per image {r['energy_ratio']:.2f}x lower"
            lines.append(line)
    return lines


def failed_lines(res: dict) -> list[str]:
    return [f"- `{f['test']}`: {f['outcome']}" + (f": {f['reason']}" if f.get("reason") else "")
            for f in res.get("failed", [])]


def markdown(res: dict, stem: str) -> str:
    out = [f"# Benchmarks on {res['device']}", "", "Command:", "", "```", res["command"], "```", "",
           tables(res, "##"), "## Goals (figures, not assertions)", "", *goal_lines(res), "",
           f"![latency and energy vs MACs]({stem}.png)", "", "## Kernels", "",
           "Median per call; `vs eager` is the eager reference's time over this provider's, same case, same run.", "",
           "| op | pass | case | provider | median us | vs eager |", "|---|---|---|---|---:|---:|"]
    for r in sorted(res["kernels"], key=lambda r: (r["op"], r["pass"], r["case"], r["provider"])):
        vs = "" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
        out.append(f"| {r['op']} | {r['pass']} | {r['case']} | {r['provider']} | {1e3 * r['median_ms']:.1f} | {vs} |")
    out += ["", "## Failed", ""]
    out += failed_lines(res) or ["None: every benchmark that ran passed."]
    out += ["", "Settings: " + "; ".join(f"{m}: {_setting_line(s)}, widths rounded to {s['round_to']}"
                                         for m, s in res["settings"].items()), ""]
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(res["inference"])
    fig, axes = plt.subplots(2, max(1, len(models)), figsize=(5.5 * max(1, len(models)), 7), squeeze=False)
    for col, model in enumerate(models):
        rows = res["inference"][model]
        base = rows.get("unpruned")
        pts = sorted(rows.items(), key=lambda kv: kv[1]["macs"])
        macs = [r["macs"] / 1e6 for _, r in pts]
        # the interleaved medians (what the speedups are computed from) where the run has them
        lat = {name: r.get("interleaved", r)["median_ms"] for name, r in pts}
        ax = axes[0][col]
        ax.plot(macs, [lat[n] for n, _ in pts], "o-", label="measured latency (median, interleaved)")
        if base:
            ax.plot(macs, [lat["unpruned"] * r["macs"] / base["macs"] for _, r in pts], "--", color="gray",
                    label="proportional to MACs")
            ax.plot([base["macs"] / 1e6], [lat["unpruned"]], "s", color="C3", ms=9, label="unpruned")
        for name, r in pts:
            if name != "unpruned":
                ax.annotate(name.replace("extracted-", "-") + "% target", (r["macs"] / 1e6, lat[name]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
        s = res["settings"][model]
        ax.set_title(f"{model}, {_setting_line(s)}", fontsize=9)
        ax.set_xlabel("MACs per image (millions)")
        ax.set_ylabel("latency per batch (ms)")
        ax.legend(fontsize=8)
        ax = axes[1][col]
        if all(r["energy"].get("available") for _, r in pts):
            ax.plot(macs, [r["energy"]["joules_per_item"] for _, r in pts], "o-", color="C2", label="measured")
            if base:
                ax.plot(macs, [base["energy"]["joules_per_item"] * r["macs"] / base["macs"] for _, r in pts], "--",
                        color="gray", label="proportional to MACs")
            ax.set_ylabel("energy per image (J)")
            ax.set_xlabel("MACs per image (millions)")
            ax.legend(fontsize=8)
        else:
            reason = next((r["energy"].get("reason") for _, r in pts if not r["energy"].get("available")), "")
            ax.text(0.5, 0.5, "energy unavailable:\n" + "\n".join(_wrap(reason, 48)), ha="center", va="center",
                    transform=ax.transAxes, fontsize=9)
            ax.set_axis_off()
    fig.suptitle(f"Unpruned vs extracted, {res['device']} ({res['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def update_readme(res: dict, stem: str, readme: Path = README, out: Path = RESULTS) -> bool:
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    rel = os.path.relpath(Path(out).resolve() / stem, readme.resolve().parent)
    failed = ([f"Failed in this run ({len(res['failed'])}; their rows are missing):", "", *failed_lines(res), ""]
              if res.get("failed") else [])
    block = "\n".join([START, "", tables(res), "Goals (figures, not assertions):", "", *goal_lines(res), "", *failed,
                       f"Full results, kernels included: [{rel}.md]({rel}.md), [{rel}.json]({rel}.json); "
                       f"plot: [{rel}.png]({rel}.png). Produced by `{res['command']}`.", "", END])
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    readme.write_text(before + block + after)
    return True


def write(res: dict, out: Path, readme: Path | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{device_slug(res['device'])}-{res['date']}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(markdown(res, stem))
    plot(res, out / f"{stem}.png")
    if readme is not None and not update_readme(res, stem, readme, out):
        print(f"warning: {readme} has no {START} ... {END} block; README not updated", file=sys.stderr)
    print(tables(res))
    print("\n".join(goal_lines(res)))
    if res.get("failed"):
        print("\nFAILED:\n" + "\n".join(failed_lines(res)))
    print(f"\nwrote {out / stem}.json, .md and .png" + (f"; updated {readme}" if readme else ""))
    return out / f"{stem}.json"


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS})")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="summarise this pytest-benchmark JSON instead of running the suites")
    parser.add_argument("--readme", type=Path, default=None,
                        help="page to update (default: benchmarks/README.md when --out is not given, else none)")
    parser.add_argument("--no-readme", action="store_true", help="do not touch any README")
    parser.add_argument("--suites", type=Path, default=MICRO,
                        help="folder of the pytest-benchmark suites (default benchmarks/micro)")
    parser.add_argument("--keep-raw", action="store_true", help="also keep pytest-benchmark's own JSON in --out")
    parser.add_argument("pytest_args", nargs="*",
                        help="passed to pytest after '--', e.g. -- --tiny -k training --energy-seconds 5")
    args = parser.parse_args(argv)
    out = args.out or RESULTS
    readme = None if args.no_readme else (args.readme or (README if args.out is None else None))
    command = "python benchmarks/run.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                            if (argv if argv is not None else sys.argv[1:]) else "")
    if args.from_json is not None:
        if not args.from_json.is_file():
            raise SystemExit(f"--from-json: no such file {args.from_json}")
        raw = json.loads(args.from_json.read_text())
        return write(summarise(raw, command), out, readme)
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.json"
        failed = run_suites(raw_path, args.pytest_args, args.suites)
        try:
            raw = json.loads(raw_path.read_text())
        except (OSError, ValueError):       # pytest broke before writing it: summarise nothing, list the failures
            raw = {"benchmarks": []}
        raw.setdefault("machine_info", {}).setdefault("polarprune", machine_info(args.pytest_args))
        res = summarise(raw, command, failed)
        path = write(res, out, readme)
        if args.keep_raw and raw_path.is_file():
            (out / f"{path.stem}-raw.json").write_text(raw_path.read_text())
    return path


if __name__ == "__main__":
    sys.exit(1 if json.loads(main().read_text()).get("failed") else 0)
