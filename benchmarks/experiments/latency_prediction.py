"""How well the latency cost predicts, and what asking for latency buys over asking for MACs.

For each model (CIFAR-style ResNet-20 and ResNet-56, torchvision ResNet-50; 3x32x32 inputs, the CLI's
--latency-batch 32 and its threads): gates attached, scores ranked by the weights' group magnitude, the latency
tables measured (pp.latency_cost), then for each target and each cost (latency, MACs) the exact budget
(pp.meet_target), the extraction, and the dense and extracted networks timed side by side (the report's
interleaved rounds). Written: the predicted and measured latency of each extracted network, the measured speedup,
and whether the measured latency is within 10% of the target's ``(1 - target)`` of dense. The figure plots
predicted against measured.

    python benchmarks/experiments/latency_prediction.py --models resnet20 resnet56 resnet50
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _record  # noqa: E402
import polarprune_cuda as pp  # noqa: E402
from polarprune_cuda.models import build_model  # noqa: E402
from polarprune_cuda.surgery.latency import LookupCost, device_name  # noqa: E402
from polarprune_cuda.train import report as report_mod  # noqa: E402
from polarprune_cuda.train.report import versions  # noqa: E402

#: the prediction is good within this relative error of the measured latency; a target is met within it too
WITHIN = 0.10


def one_model(name: str, targets, batch: int, seed: int, cache, max_seconds: float,
              timing_seconds: float | None = None, round_to: int | None = None, device: str = "cpu") -> list[dict]:
    torch.manual_seed(seed)
    model = build_model(name, 10, 3, True).eval().to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    pp.attach_gates(model, x[:1], round_to=round_to)
    pp.scores_from_magnitude(model)
    built = pp.latency_cost(model, x, cache=cache, max_seconds=max_seconds, progress=True)
    bank = pp.find_bank(model)
    ranked = bank.scores.detach().clone()
    # the composition the build replaced, for the same networks: the layers' sum times the dense network's ratio
    scaled = LookupCost(bank, [s for s, _ in built.lookup.sites], built.tables, built.lookup.elements,
                        built.calibration[1] / built.calibration[0])
    with torch.no_grad():
        bank.scores.abs_()   # every gate open: the dense network, gates folded away
    dense = pp.extract(model, x[:1])
    rows = []
    for cost in ("latency", "macs"):
        for target in targets:
            with torch.no_grad():
                bank.scores.copy_(ranked)
            budget = pp.meet_target(model, target, cost)
            predicted = built.predict(model)
            small = pp.extract(model, x[:1])
            lat = report_mod.latency_side_by_side({"dense": dense, "pruned": small}, x, max_seconds=timing_seconds)
            dense_ms, pruned_ms = lat["dense"]["median_ms"], lat["pruned"]["median_ms"]
            macs = pp.count(small, x[:1])["macs"] / pp.count(dense, x[:1])["macs"]
            rows.append({
                "model": name, "cost": cost, "target": target, "achieved": budget.achieved_sparsity,
                "predicted_ms": predicted, "measured_ms": pruned_ms, "dense_ms": dense_ms,
                "predicted_dense_ms": bank.exact_cost("latency").total,
                "scaled_share_error": scaled.cost(bank.effective((bank.scores.detach() > 0).float())) / scaled.total
                * lat["speedup_rounds"]["median"] - 1,
                "error": (predicted - pruned_ms) / pruned_ms,
                # the predicted share of the dense network against the measured share (1 / the paired speedup):
                # the machine's drift between the tables' build and this timing does not move it
                "share_error": predicted / bank.exact_cost("latency").total * lat["speedup_rounds"]["median"] - 1,
                "speedup": lat["speedup_rounds"]["median"], "speedup_q": [lat["speedup_rounds"]["q1"],
                                                                          lat["speedup_rounds"]["q3"]],
                "macs_share": macs,
            })
            print(f"{name} {cost} {target}: predicted {predicted:.2f} ms, measured {pruned_ms:.2f} ms "
                  f"({100 * rows[-1]['error']:+.1f}%; share {100 * rows[-1]['share_error']:+.1f}%, scaled "
                  f"{100 * rows[-1]['scaled_share_error']:+.1f}%), "
                  f"speedup {rows[-1]['speedup']:.2f}x (asked "
                  f"{1 / (1 - target):.2f}x), MACs share {macs:.3f}", flush=True)
    return [{"model": name, "build": {"seconds": built.seconds, "tables": len(built.tables),
                                      "measured": built.measured, "scale": built.scale,
                                      "per_element": built.per_element,
                                      "calibration": built.calibration}}] + rows


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    markers = {"latency": "o", "macs": "s"}
    for model in sorted({r["model"] for r in rows}):
        for cost, marker in markers.items():
            pts = [r for r in rows if r["model"] == model and r["cost"] == cost]
            ax.scatter([r["measured_ms"] for r in pts], [r["predicted_ms"] for r in pts], marker=marker,
                       label=f"{model}, {cost} target")
    lo = min(min(r["measured_ms"], r["predicted_ms"]) for r in rows) * 0.8
    hi = max(max(r["measured_ms"], r["predicted_ms"]) for r in rows) * 1.2
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.fill_between([lo, hi], [lo * (1 - WITHIN), hi * (1 - WITHIN)], [lo * (1 + WITHIN), hi * (1 + WITHIN)],
                    color="0.9", label="within 10%")
    ax.set(xscale="log", yscale="log", xlabel="measured latency of the extracted network (ms per batch)",
           ylabel="predicted by the latency cost (ms)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def met(r: dict) -> bool:
    """The extracted network's measured latency, from the paired speedup (the rounds' median of dense over
    pruned), is within WITHIN of the target's share of the dense network."""
    return abs(1 / r["speedup"] - (1 - r["target"])) <= WITHIN * (1 - r["target"])


def _share(r: dict, key: str = "share_error") -> str:
    value = r.get(key)
    if value is None and key == "share_error":   # a record from before the column: the same quantities
        value = r["predicted_ms"] / r["predicted_dense_ms"] * r["speedup"] - 1
    return "-" if value is None else f"{100 * value:+.1f}%"


def _ratio(build: dict) -> float:
    """The dense network's measured time over its layers' sum (a record from before the pair: its scale)."""
    cal = build.get("calibration")
    if isinstance(cal, (list, tuple)) and len(cal) == 2 and all(isinstance(v, (int, float)) for v in cal):
        return cal[1] / cal[0]
    return build["scale"]


def _share_error(r: dict) -> float:
    return r.get("share_error", r["predicted_ms"] / r["predicted_dense_ms"] * r["speedup"] - 1)


def render(record: dict, stem: str) -> str:
    rows, builds = record["rows"], record["builds"]
    lines = [f"# Latency cost: predicted against measured ({record['device']}, batch {record['batch']}"
             + (f", round_to {record['round_to']}" if record.get("round_to") else "") + ")", "",
             f"`{record['command']}`", "", f"![predicted against measured]({stem}.png)", "",
             "Measured latency share: 1 / the paired speedup (the median of the rounds' dense/pruned ratios), which "
             "the machine's drift between rows does not move; the absolute times drift more.", "",
             "Share error: the predicted share of the dense network (predicted ms over the predicted dense ms) against "
             "the measured share; the error column compares absolute times measured minutes apart. Scaled: the share "
             "error of the same network under the composition replaced (the layers' sum times the dense network's "
             "ratio, no time per element read).", "",
             "| model | target of | target | predicted ms | measured ms | error | share error | scaled | measured "
             "speedup (asked) | latency share | MACs share | latency within 10% |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['cost']} | {r['target']:.2f} | {r['predicted_ms']:.2f} | "
                     f"{r['measured_ms']:.2f} | {100 * r['error']:+.1f}% | {_share(r)} | "
                     f"{_share(r, 'scaled_share_error')} | "
                     f"{r['speedup']:.2f}x "
                     f"({1 / (1 - r['target']):.2f}x) | {1 / r['speedup']:.3f} | {r['macs_share']:.3f} | "
                     f"{'yes' if met(r) else 'no'} |")
    lat_rows = [r for r in rows if r["cost"] == "latency"]
    mac_rows = [r for r in rows if r["cost"] == "macs"]
    scaled = "" if any("scaled_share_error" not in r for r in rows) else (
        f"; scaled: {sum(abs(r['scaled_share_error']) <= WITHIN for r in rows)} of {len(rows)}")
    shares = (f" Predicted share within 10% of the measured share: "
              f"{sum(abs(_share_error(r)) <= WITHIN for r in lat_rows)} of {len(lat_rows)} (all rows: "
              f"{sum(abs(_share_error(r)) <= WITHIN for r in rows)} of {len(rows)}{scaled}).")
    lines += ["", f"Prediction within 10% of measured: {sum(abs(r['error']) <= WITHIN for r in lat_rows)} of "
              f"{len(lat_rows)} latency-targeted extractions (all rows: "
              f"{sum(abs(r['error']) <= WITHIN for r in rows)} of {len(rows)}).{shares} Latency target met within 10%: "
              f"{sum(map(met, lat_rows))} of {len(lat_rows)} asking for latency, {sum(map(met, mac_rows))} of "
              f"{len(mac_rows)} asking for MACs.", "",
              "Table builds: " + "; ".join(f"{b['model']} {b['build']['seconds']:.0f} s ({b['build']['tables']} "
                                            f"layers, dense network / layers' sum {_ratio(b['build']):.2f})"
                                            for b in builds) + ".",
              "", f"Wall time {record.get('seconds', 0):.0f} s, {record['threads']} threads."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "resnet50"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the tables and the networks are timed (cpu, cuda)")
    parser.add_argument("--round-to", type=int, default=None,
                        help="attach_gates(round_to=): kept widths in steps of it, the tables measured at each")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="bound on each model's table build")
    parser.add_argument("--cache", default=None, help="the tables' file (default: the library's)")
    parser.add_argument("--timing-seconds", type=float, default=20.0,
                        help="the most each dense-against-pruned timing runs (the report's rule otherwise)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--render", default=None, help="write the Markdown of a record (.json) again, measuring "
                                                          "nothing")
    args = parser.parse_args(argv)
    if args.render:
        path = Path(args.render)
        (path.with_suffix(".md")).write_text(render(json.loads(path.read_text()), path.stem))
        return 0
    start = time.time()
    rows, builds = [], []
    for name in args.models:
        got = one_model(name, args.targets, args.batch, args.seed, args.cache, args.max_seconds, args.timing_seconds,
                        args.round_to, args.device)
        builds.append(got[0])
        rows += got[1:]
    stem = f"latency-prediction-{args.tag}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure(rows, out / f"{stem}.png")
    record = {"command": _record.command("latency_prediction.py", argv),
              "device": device_name(torch.device(args.device)), "batch": args.batch, "round_to": args.round_to,
              "threads": torch.get_num_threads(), "versions": versions(), "builds": builds, "rows": rows,
              "seconds": time.time() - start}
    _record.write(out, stem, record, render(record, stem))
    return 0


if __name__ == "__main__":
    sys.exit(main())
