"""Where a latency prediction goes wrong, layer by layer: the table, the layer alone, the layer inside the network.

For one model (3x32x32 inputs, scores ranked by the weights' group magnitude), the latency tables are measured
(pp.latency_cost), the budget meets a latency target, and for every Conv2d/BatchNorm2d/Linear of the extracted
network three times are written: its table read at its kept widths (what the budget used, before the
composition), the same layer timed alone at those widths now, and its time inside the network (hooks around it
over repeated passes). Then the whole network, timed, against the prediction. Last, one convolution of the
network timed repeatedly, to show the spread of a single call on this device (min and quantiles).

    python benchmarks/experiments/latency_layers.py --model resnet20 --target 0.5 --round-to 8
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import _record  # noqa: E402
import polarprune_cuda as pp  # noqa: E402
from polarprune_cuda.models import build_model  # noqa: E402
from polarprune_cuda.surgery import latency as lat  # noqa: E402
from polarprune_cuda.surgery.costs import per_channel, widths  # noqa: E402
from polarprune_cuda.surgery.inputs import run_hooked  # noqa: E402
from polarprune_cuda.train.report import versions  # noqa: E402

LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def inside(net: nn.Module, x: torch.Tensor, passes: int) -> dict[str, float]:
    """Each layer's median ms inside the network over ``passes`` passes (two warm-up passes first)."""
    mods = {n: m for n, m in net.named_modules() if isinstance(m, LAYERS)}
    times = {n: [] for n in mods}
    started = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: started.__setitem__(n, time.perf_counter()))
               for n, m in mods.items()]
    handles += [m.register_forward_hook(lambda m, a, o, n=n: times[n].append(time.perf_counter() - started[n]))
                for n, m in mods.items()]
    with torch.inference_mode():
        for k in range(passes + 2):
            if k == 2:
                for v in times.values():
                    v.clear()
            net(x)
    for h in handles:
        h.remove()
    return {n: statistics.median(v) * 1e3 for n, v in times.items()}


def spread(conv: nn.Module, x: torch.Tensor, calls: int) -> dict:
    """min, quantiles and max (ms) of ``calls`` calls of one layer on one input."""
    with torch.inference_mode():
        for _ in range(5):
            conv(x)
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            conv(x)
            ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    n = len(ts)
    return {"min": ts[0], "p10": ts[n // 10], "p50": ts[n // 2], "p90": ts[9 * n // 10], "max": ts[-1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--round-to", type=int, default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--passes", type=int, default=12, help="passes of the network the in-network times take")
    parser.add_argument("--calls", type=int, default=200, help="calls of the one convolution timed for the spread")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = build_model(args.model, 10, 3, True).eval()
    x = torch.randn(args.batch, 3, 32, 32)
    pp.attach_gates(model, x[:1], round_to=args.round_to)
    pp.scores_from_magnitude(model)
    built = pp.latency_cost(model, x, cache=args.cache)
    pp.meet_target(model, args.target, "latency")
    predicted = built.predict(model)
    small = pp.extract(model, x[:1]).eval()
    mods = {n: m for n, m in small.named_modules() if isinstance(m, LAYERS)}
    shapes = {}
    run_hooked(small, (x,), list(mods.values()), lambda m, a: shapes.__setitem__(m, tuple(a[0].shape)), pre=True)
    tables = {s.name: t for s, t in built.lookup.sites}
    in_net = inside(small, x, args.passes)
    rows = []
    for name, m in mods.items():
        c_in, c_out = widths(m)
        table = tables.get(name)
        rows.append({"layer": name, "c_in": c_in, "c_out": c_out,
                     "table_ms": table.at(0 if per_channel(m) else c_in, c_out) if table else None,
                     "alone_ms": lat.layer_ms(m, torch.randn(shapes[m])), "inside_ms": in_net[name]})
    whole = lat.network_ms(small, (x,))
    # the convolution with the largest input (the first stage's, where the table and the network disagree most)
    widest = max((m for m in mods.values() if isinstance(m, nn.Conv2d) and m.in_channels > 3),
                 key=lambda m: (shapes[m][1] * shapes[m][2] * shapes[m][3], m.out_channels))
    name_w = next(n for n, m in mods.items() if m is widest)
    record = {"command": _record.command("latency_layers.py", argv), "device": lat.device_name(torch.device("cpu")),
              "model": args.model, "target": args.target, "round_to": args.round_to, "batch": args.batch,
              "calls": args.calls,
              "versions": versions(), "rows": rows, "whole_ms": whole, "predicted_ms": predicted,
              "dense_ms": built.dense_ms, "scale": built.scale, "per_element": built.per_element,
              "spread": {"layer": name_w, "shape": list(shapes[widest]), "widths": list(widths(widest)),
                         **spread(widest, torch.randn(shapes[widest]), args.calls)}}
    stem = f"latency-layers-{args.model}-{args.tag}"
    _record.write(Path(args.out), stem, record, render(record))
    return 0


def render(r: dict) -> str:
    rows = r["rows"]
    total = {k: sum(row[k] or 0.0 for row in rows) for k in ("table_ms", "alone_ms", "inside_ms")}
    lines = [f"# {r['model']}, latency target {r['target']:.2f}"
             + (f", round_to {r['round_to']}" if r["round_to"] else "") + f": layer by layer ({r['device']}, "
             f"batch {r['batch']})", "", f"`{r['command']}`", "",
             "Table: the layer's table read at its kept widths (before the composition); alone: the layer timed "
             "alone at those widths now; inside: its median inside the extracted network (hooks).", "",
             "| layer | in | out | table ms | alone ms | inside ms | inside / alone |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        table = "-" if row["table_ms"] is None else f"{row['table_ms']:.3f}"
        lines.append(f"| {row['layer']} | {row['c_in']} | {row['c_out']} | {table} | {row['alone_ms']:.3f} | "
                     f"{row['inside_ms']:.3f} | {row['inside_ms'] / row['alone_ms']:.2f} |")
    s = r["spread"]
    lines += ["", f"Sums: table {total['table_ms']:.2f} ms, alone {total['alone_ms']:.2f} ms, inside "
              f"{total['inside_ms']:.2f} ms. The whole network: {r['whole_ms']:.2f} ms measured, "
              f"{r['predicted_ms']:.2f} ms predicted (dense {r['dense_ms']:.2f} ms at the build; scale "
              f"{r['scale']:.2f}, {r['per_element'] * 1e6:.3f} ms per million elements read).", "",
              f"One call of {s['layer']} ({s['widths'][0]} to {s['widths'][1]} channels, input "
              f"{'x'.join(map(str, s['shape']))}), timed {r['calls']} times: min {s['min']:.2f}, "
              f"p10 {s['p10']:.2f}, p50 {s['p50']:.2f}, p90 {s['p90']:.2f}, max {s['max']:.2f} ms."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
