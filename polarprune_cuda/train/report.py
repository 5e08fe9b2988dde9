"""Measurements and the run report: latency side by side, energy where measurable, JSON, Markdown, plots."""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import energy
from .._io import write_text
from ..gates.bank import find_bank
from ..surgery.latency import sync
from .plots import plots, sparse_plots

REPORT_FORMAT = 1


#: the latency measurement: at least MIN_ROUNDS interleaved rounds, then more until the rounds' speedups (the
#: dense time over the pruned time of the same round) have a spread (interquartile range) within STABLE of their
#: median, or until MAX_SECONDS of measuring; a spread that still covers 1.0x is reported as unreliable
MIN_ROUNDS, MAX_ROUNDS, MAX_SECONDS, STABLE = 30, 300, 10.0, 0.1


@torch.no_grad()
def latency_side_by_side(models: dict[str, nn.Module], x: torch.Tensor, rounds: int = MIN_ROUNDS,
                         warmup: int = 3, max_seconds: float | None = None, max_rounds: int | None = None,
                         clock=time.perf_counter) -> dict[str, dict]:
    """Median and quartiles of one forward pass per model, the models interleaved round by round (the order
    rotating, so neither always runs first). With a ``dense`` and a ``pruned`` model, also the speedup: the median
    of the per-round ratios with its quartiles, measured until stable (module constants) and flagged unreliable
    where the quartiles cover 1.0x."""
    max_seconds = MAX_SECONDS if max_seconds is None else max_seconds   # read now: the suite shortens them
    max_rounds = MAX_ROUNDS if max_rounds is None else max_rounds
    times = {name: [] for name in models}
    modes = {name: m.training for name, m in models.items()}
    names = list(models)
    paired = {"dense", "pruned"} <= set(models)
    try:
        for m in models.values():
            m.eval()
        for _ in range(warmup):
            for m in models.values():
                m(x)
        sync(x.device)
        start = clock()
        k = 0
        while True:
            for name in names[k % len(names):] + names[:k % len(names)]:
                t0 = clock()
                models[name](x)
                sync(x.device)
                times[name].append(clock() - t0)
            k += 1
            if k < rounds:
                continue
            if not paired or k >= max_rounds or clock() - start >= max_seconds:
                break
            if _ratio_spread(times)[3] <= STABLE:
                break
    finally:
        for name, m in models.items():
            m.train(modes[name])
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[name] = {"median_ms": statistics.median(ts) * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3,
                     "rounds": len(ts)}
    if paired:
        median, q1, q3, _ = _ratio_spread(times)
        out["speedup_rounds"] = {"median": median, "q1": q1, "q3": q3, "reliable": not q1 <= 1.0 <= q3}
    return out


def _ratio_spread(times: dict[str, list[float]]) -> tuple[float, float, float, float]:
    """(median, first quartile, third quartile, interquartile range over the median) of the per-round
    speedups dense / pruned."""
    ratios = [d / p for d, p in zip(times["dense"], times["pruned"]) if p > 0]
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return median, q1, q3, (q3 - q1) / median


def speedup_text(lat: dict) -> str:
    """The latency speedup as the report says it: the median with its spread over the rounds, and a warning
    where that spread covers 1.0x (the two models are not told apart on this machine)."""
    sr = lat.get("speedup_rounds")
    if sr is None:
        return f"{lat['speedup']:.2f}x"
    text = f"{lat['speedup']:.2f}x (rounds' quartiles {sr['q1']:.2f}-{sr['q3']:.2f}x)"
    return text if sr["reliable"] else text + ", unreliable: the spread covers 1.0x"


@torch.no_grad()
def energy_side_by_side(models: dict[str, nn.Module], x: torch.Tensor, seconds: float = 2.0) -> dict:
    """Energy per forward pass from a hardware counter (NVML on a GPU, RAPL on a CPU), or why it is unavailable.

    Never an estimate: without a readable counter the result says so.
    """
    counter, where = energy.open_counter(x.device)
    if counter is None:
        return {"available": False, "reason": where}
    result = {"available": True, "source": where}
    for name, m in models.items():
        was = m.training
        m.eval()
        try:
            got = energy.measure(lambda: m(x), counter, seconds, sync=lambda: sync(x.device))
        except RuntimeError as exc:
            return {"available": False, "reason": str(exc)}
        finally:
            m.train(was)
        result[name] = {"joules_per_batch": got["joules"] / got["calls"], "batches": got["calls"]}
    return result


def versions() -> dict:
    from .._version import __version__

    out = {"polarprune_cuda": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform()}
    try:
        import torch_pruning

        out["torch_pruning"] = getattr(torch_pruning, "__version__", "unknown")
    except ImportError:
        pass
    return out


def training_section(result) -> dict | None:
    """report.json "training": what the run's training cost (loop.training_cost), the dense baseline's with
    --baseline, and the ratios run / baseline where both have the figure."""
    own = getattr(result, "training", None)
    if own is None:
        return None
    base = (result.baseline or {}).get("training")
    ratio = None
    if base is not None:
        ratio = {k: own[k] / base[k] if own[k] is not None and base[k] else None for k in ("seconds", "macs", "joules")}
    return {"run": own, "baseline": base, "ratio": ratio}


def predicted_latency(gated: nn.Module, latency: dict) -> dict | None:
    """What the ``latency`` cost model of the gated model predicts for the dense and the extracted network (ms
    per batch), against what was measured (``latency``: :func:`latency_side_by_side`'s)."""
    bank = find_bank(gated)
    if bank is None or "latency" not in bank.cost_kinds:
        return None
    total, pruned_ms = bank.exact_cost("latency").total, bank.hard_cost("latency")
    measured = latency["pruned"]["median_ms"]
    return {"dense_ms": total, "pruned_ms": pruned_ms, "speedup": total / pruned_ms,
            "error": (pruned_ms - measured) / measured}


def build_report(result, command: list[str], latency: dict, energy: dict, latency_batch: int) -> dict:
    if getattr(result, "pruner", None) is not None:
        return build_sparse_report(result, command, latency, energy, latency_batch)
    cfg = result.config
    dense, pruned = result.dense_count, result.pruned_count
    kept, total = result.channels
    sparsity = {
        "channels": 1 - kept / total if total else None,   # None: no channel gates (blocks only)
        "params": 1 - pruned["params"] / dense["params"],
        "macs": 1 - pruned["macs"] / dense["macs"],
    }
    rounds = latency.get("speedup_rounds")
    speedup = rounds["median"] if rounds else latency["dense"]["median_ms"] / latency["pruned"]["median_ms"]
    predicted = predicted_latency(result.gated_model, latency) if cfg.cost == "latency" else None
    if predicted is not None:
        sparsity["latency"] = 1 - predicted["pruned_ms"] / predicted["dense_ms"]
    report = {
        "format": REPORT_FORMAT,
        "method": "polar",
        "command": " ".join(command),
        "versions": versions(),
        "config": cfg.to_dict(),
        "data": {"name": result.data.name, "source": result.data.source, "train": len(result.data.train_y),
                 "test": len(result.data.test_y), "num_classes": result.data.num_classes,
                 "preprocessing": getattr(result.data, "preprocessing", None)},
        "target_sparsity": cfg.target_sparsity,
        "cost": cfg.cost,
        "achieved_sparsity": sparsity[cfg.cost],
        "sparsity": sparsity,
        "dense": dense,
        "pruned": pruned,
        "channels": {"kept": kept, "total": total},
        "accuracy": {
            "pruned": result.pruned_accuracy,
            "gated": result.gated_accuracy,
            "finetuned": result.finetuned_accuracy,
            "baseline": None if result.baseline is None else result.baseline["accuracy"],
        },
        "latency": {"device": str(next(result.pruned_model.parameters()).device), "batch": latency_batch,
                    "threads": torch.get_num_threads(), **latency, "speedup": speedup,
                    "macs_ratio": dense["macs"] / pruned["macs"], "predicted": predicted},
        "energy": energy,
        "history": {k: v for k, v in vars(result.history).items()},
        "seconds": result.seconds,
        "baseline_curve": None if result.baseline is None else result.baseline["test_accuracy"],
        "blocks": result.blocks,
        "budget": getattr(result.history, "budget", None) or None,
        "training": training_section(result),
        "init": getattr(result, "init", None),
    }
    acc = report["accuracy"]
    if acc["baseline"] is not None:
        final = acc["finetuned"] if acc["finetuned"] is not None else acc["pruned"]
        acc["drop_points"] = 100 * (acc["baseline"] - final)
    return report


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    d, p = report["dense"], report["pruned"]
    lat = report["latency"]
    rows = [
        ("params", _fmt_int(d["params"]), _fmt_int(p["params"])),
        ("MACs / sample", _fmt_int(d["macs"]), _fmt_int(p["macs"])),
        ("channels", _fmt_int(report["channels"]["total"]), _fmt_int(report["channels"]["kept"])),
    ]
    blocks = report.get("blocks")
    if blocks:
        rows += [
            ("residual blocks (gated)", str(len(blocks["gated"])), str(len(blocks["gated"]) - len(blocks["removed"]))),
            ("depth (conv/linear layers on the longest path)", str(blocks["depth"]["dense"]),
             str(blocks["depth"]["pruned"])),
        ]
    rows += [
        (f"latency, batch {lat['batch']} ({lat['device']}, median ms)", f"{lat['dense']['median_ms']:.2f}",
         f"{lat['pruned']['median_ms']:.2f}"),
    ]
    if lat.get("predicted"):
        pred = lat["predicted"]
        rows.append(("latency predicted by the cost model (ms)", f"{pred['dense_ms']:.2f}",
                     f"{pred['pruned_ms']:.2f} ({100 * pred['error']:+.1f}% of measured)"))
    acc = report["accuracy"]
    rows.append(("test accuracy", "-" if acc["baseline"] is None else f"{100 * acc['baseline']:.2f}%",
                 f"{100 * acc['pruned']:.2f}%"))
    if acc["finetuned"] is not None:
        rows.append(("test accuracy after fine-tuning", "", f"{100 * acc['finetuned']:.2f}%"))
    energy = report["energy"]
    if energy.get("available"):
        rows.append((f"energy per batch (J, {energy['source']})", f"{energy['dense']['joules_per_batch']:.4f}",
                     f"{energy['pruned']['joules_per_batch']:.4f}"))
    return rows + training_rows(report)


def training_rows(report: dict) -> list[tuple[str, str, str]]:
    """The training's cost: the dense baseline's (with --baseline) beside the run's."""
    t = report.get("training")
    if not t:
        return []
    base = t["baseline"] or {}
    rows = [("training time (s, the steps)", f"{base['seconds']:.1f}" if base else "-", f"{t['run']['seconds']:.1f}"),
            ("training MACs (forward + backward)", f"{base['macs']:.3g}" if base else "-", f"{t['run']['macs']:.3g}")]
    if t["run"]["joules"] is not None:
        rows.append(("training energy (J)", f"{base['joules']:.1f}" if base.get("joules") is not None else "-",
                     f"{t['run']['joules']:.1f}"))
    return rows


def _training_lines(report: dict) -> list[str]:
    t = report.get("training")
    if not t:
        return []
    run = t["run"]
    line = (f"Training cost: {run['seconds']:.1f} s of steps, {run['macs']:.3g} MACs (forward and backward)"
            + (f", {run['joules']:.1f} J" if run["joules"] is not None else f"; energy: {run['energy']}") + ".")
    if run.get("switch_step") is not None:
        line += f" From step {run['switch_step']} (the gates froze) it trained the extracted network."
    if t["ratio"]:
        r = t["ratio"]
        line += (f" Against the dense baseline of the same epochs: {r['seconds']:.2f}x the time, "
                 f"{r['macs']:.2f}x the MACs" + (f", {r['joules']:.2f}x the energy" if r["joules"] else "") + ".")
    return [line]


def _channels_text(report: dict) -> str:
    share = report["sparsity"]["channels"]
    return "no channel gates, " if share is None else f"channels {100 * share:.1f}%, "


def _closing_lines(report: dict) -> list[str]:
    """The accuracy drop, the removed blocks and the energy source, as the report's Markdown says them."""
    lines = []
    acc = report["accuracy"]
    if "drop_points" in acc:
        lines.append(f"Accuracy drop against the dense baseline trained with the same recipe: "
                     f"{acc['drop_points']:.2f} points.")
    blocks = report.get("blocks")
    if blocks:
        removed = ", ".join(f"`{b}`" for b in blocks["removed"]) or "none"
        lines.append(f"Removed residual blocks ({len(blocks['removed'])} of {len(blocks['gated'])} gated, each "
                     f"replaced by its shortcut): {removed}.")
    init = report.get("init")
    if init and init.get("reason"):
        lines.append(f"Started from `{init['path']}`; its classifier was re-initialised "
                     f"({', '.join(init['classifier_reset'])}): {init['reason']}.")
    energy = report["energy"]
    lines.append("Energy: " + (f"{energy['source']}." if energy.get("available")
                               else f"unavailable ({energy['reason']})."))
    return lines


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"# One-pass pruning: {cfg['model']} on {report['data']['name']}",
        "",
        f"Target: {100 * report['target_sparsity']:.1f}% of {report['cost']} removed; achieved "
        f"**{100 * report['achieved_sparsity']:.1f}%** ({_channels_text(report)}"
        f"params {100 * report['sparsity']['params']:.1f}%, MACs {100 * report['sparsity']['macs']:.1f}%)."
        + (f" The target is out of reach: {report['budget']['reason']}." if (report.get("budget") or {}).get("reason")
           else ""),
        "",
        "| | dense | pruned (extracted) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(report)]
    lat = report["latency"]
    acc = report["accuracy"]
    lines += [
        "",
        f"Latency speedup {speedup_text(lat)} for a MACs ratio of {lat['macs_ratio']:.2f}x, measured side by "
        f"side in one run ({lat['dense']['rounds']} interleaved rounds, the median of the rounds' ratios, "
        f"{lat['threads']} threads).",
        f"The pruned accuracy is measured on the extracted model; the gated model at the end of training had "
        f"{100 * acc['gated']:.2f}%.",
    ]
    lines += _closing_lines(report) + _training_lines(report)
    lines += ["", "![gate probabilities](gates.png)", "", "![density](density.png)", "",
              "![training MACs per step](macs.png)", "", "![accuracy](accuracy.png)", "", "Command:", "", "```",
              report["command"], "```", "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def write(report: dict, out: Path) -> None:
    """report.json, report.md and the plots, each written atomically."""
    out = Path(out)
    if report.get("method", "polar") != "polar":
        report["files"] = sparse_plots(report, out) + ["report.md", "report.json", "model/weights.pt",
                                                       "model/weights.pt.sha256", "model/sparse.pt",
                                                       "model/sparse.pt.sha256"]
        write_text(out / "report.json", json.dumps(report, indent=1))
        write_text(out / "report.md", sparse_markdown(report))
        return
    report["files"] = plots(report, out) + ["report.md", "report.json", "model/spec.json", "model/weights.pt",
                                          "model/weights.pt.sha256"]
    write_text(out / "report.json", json.dumps(report, indent=1))
    write_text(out / "report.md", markdown(report))


def _print_rows(rows: list[tuple[str, str, str]], stream) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, (a, b, c) in enumerate(rows):
        print(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}", file=stream)
        if i == 0:
            print("-" * (sum(widths) + 4), file=stream)


def print_table(report: dict, stream=None) -> None:
    stream = sys.stdout if stream is None else stream
    if report.get("method", "polar") != "polar":
        _print_rows([("", "dense", "pruned")] + sparse_rows(report), stream)
        print(f"{report['method']}: weight sparsity {100 * report['achieved_sparsity']:.2f}% "
              f"(target {100 * report['target_sparsity']:.1f}%)", file=stream)
        return
    _print_rows([("", "dense", "pruned")] + summary_rows(report), stream)
    print(f"achieved {report['cost']} sparsity {100 * report['achieved_sparsity']:.1f}% "
          f"(target {100 * report['target_sparsity']:.1f}%), latency speedup {speedup_text(report['latency'])}",
          file=stream)
    reason = (report.get("budget") or {}).get("reason")
    if reason:
        print(f"target out of reach: {reason}", file=stream)
    blocks = report.get("blocks")
    if blocks:
        print(f"removed blocks ({len(blocks['removed'])} of {len(blocks['gated'])}): "
              f"{', '.join(blocks['removed']) or 'none'}", file=stream)


# ----------------------------------------------------------------------------- gradual unstructured methods

SPARSE_NOTE = ("Unstructured zeros keep every layer's shape: dense kernels run the pruned model at the dense "
               "model's speed (the latency row shows it); the gain is storage, in the sparse copy.")


def build_sparse_report(result, command: list[str], latency: dict, energy: dict, latency_batch: int) -> dict:
    cfg = result.config
    p = result.pruner
    report = {
        "format": REPORT_FORMAT,
        "method": cfg.method,
        "command": " ".join(command),
        "versions": versions(),
        "config": cfg.to_dict(),
        "data": {"name": result.data.name, "source": result.data.source, "train": len(result.data.train_y),
                 "test": len(result.data.test_y), "num_classes": result.data.num_classes,
                 "preprocessing": getattr(result.data, "preprocessing", None)},
        "target_sparsity": cfg.target_sparsity,
        "achieved_sparsity": result.sparsity["sparsity"],
        "sparsity": result.sparsity,
        "pruner": {"class": type(p).__name__, **p._config(), "updates": len(p.updates),
                   "end_step": p.end_step, "final_update_density": p.final_update_density()},
        "sizes": result.sizes,
        "accuracy": {"pruned": result.pruned_accuracy,
                     "baseline": None if result.baseline is None else result.baseline["accuracy"]},
        "latency": {"device": str(next(result.pruned_model.parameters()).device), "batch": latency_batch,
                    "threads": torch.get_num_threads(), **latency,
                    "speedup": (latency["speedup_rounds"]["median"] if "speedup_rounds" in latency
                                else latency["dense"]["median_ms"] / latency["pruned"]["median_ms"])},
        "energy": energy,
        "history": {k: v for k, v in vars(result.history).items()},
        "mask_updates": p.updates,
        "seconds": result.seconds,
        "baseline_curve": None if result.baseline is None else result.baseline["test_accuracy"],
        "note": SPARSE_NOTE,
        "training": training_section(result),
    }
    acc = report["accuracy"]
    if acc["baseline"] is not None:
        acc["drop_points"] = 100 * (acc["baseline"] - acc["pruned"])
    return report


def sparse_rows(report: dict) -> list[tuple[str, str, str]]:
    sp, sizes, lat, acc = report["sparsity"], report["sizes"], report["latency"], report["accuracy"]
    rows = [
        ("nonzero conv/linear weights and biases", _fmt_int(sp["total"]), _fmt_int(sp["nonzeros"])),
        ("saved size (bytes)", _fmt_int(sizes["dense_bytes"]), f"{_fmt_int(sizes['sparse_bytes'])} (sparse copy)"),
        (f"latency, batch {lat['batch']} ({lat['device']}, median ms)", f"{lat['dense']['median_ms']:.2f}",
         f"{lat['pruned']['median_ms']:.2f}"),
        ("test accuracy", "-" if acc["baseline"] is None else f"{100 * acc['baseline']:.2f}%",
         f"{100 * acc['pruned']:.2f}%"),
    ]
    return rows + training_rows(report)


def sparse_markdown(report: dict) -> str:
    cfg, pr = report["config"], report["pruner"]
    lines = [
        f"# Gradual unstructured pruning ({report['method']}): {cfg['model']} on {report['data']['name']}", "",
        f"Target weight sparsity {100 * report['target_sparsity']:.1f}%; achieved "
        f"**{100 * report['achieved_sparsity']:.2f}%** (1 - nonzeros / total over Conv2d/Linear weights and "
        f"biases). {pr['updates']} mask updates every {pr['update_every']} steps until step {pr['end_step']}, "
        f"start {pr['start']}" + (f", select ratio {pr['select_ratio']}" if "select_ratio" in pr else "") + ".",
        "", "| | dense | pruned |", "|---|---:|---:|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in sparse_rows(report)]
    lines += ["", report["note"]]
    lines += _closing_lines(report)
    lines += ["", "![density](density.png)", "", "![accuracy](accuracy.png)", "", "Command:", "", "```",
              report["command"], "```", "", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
              ""]
    return "\n".join(lines)


