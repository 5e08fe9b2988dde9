"""Kernel benchmark: eager PyTorch vs torch.compile vs Triton (vs the CUDA extension when built).

    .venv/bin/python benchmarks/micro/kernels.py                 # on a GPU: full sizes
    .venv/bin/python benchmarks/micro/kernels.py --quick         # small sizes (CPU: eager and compile only)

For each op and pass (forward, backward, full) it reports the median time, the
bytes the op must move at least, the achieved bandwidth, and that bandwidth
over a device-to-device copy measured in the same run. Providers are measured
side by side in one process. Results go to
benchmarks/results/kernels-<device>-<date>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # common.py beside this script, however it is loaded
import common  # noqa: E402
import polarprune_cuda as pp  # noqa: E402
from polarprune_cuda.ops import backends  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def bench(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()``."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


#: ops timed under torch.compile (the others are compiled only as part of the bank)
COMPILE_OPS = ("channel_gate", "channel_gate_backward", "binary_gate", "binary_gate_backward", "gate_penalty")


def providers(device: torch.device) -> dict[str, dict]:
    """name -> op implementations (reference signatures), for the providers of common.PROVIDERS that can be
    timed on ``device``."""
    out = {}
    for name in common.PROVIDERS:
        impls = {op: common.provider_op(name, op, device)[0]
                 for op in (COMPILE_OPS if name == "compile" else backends.OPS)}
        if all(fn is not None for fn in impls.values()):
            out[name] = impls
    return out


def activation_cases(quick: bool, device):
    shapes = [(8, 64, 32, 32), (8, 256, 14, 14)] if quick else [(256, 64, 56, 56), (256, 256, 56, 56),
                                                                  (256, 1024, 14, 14), (256, 2048, 7, 7)]
    dtypes = [torch.float32] if device.type == "cpu" else [torch.bfloat16, torch.float32]
    for shape in shapes:
        for dtype in dtypes:
            yield shape, dtype


def run(quick: bool) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reps = 5 if quick else 20
    provs = providers(device)
    rows = []

    def record(op, case, provider, seconds, floor_bytes, copy_bw):
        bw = floor_bytes / seconds
        rows.append({"op": op, "case": case, "provider": provider, "us": seconds * 1e6, "floor_bytes": floor_bytes,
                     "GBps": bw / 1e9, "of_copy": bw / copy_bw})

    for shape, dtype in activation_cases(quick, device):
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        dy = torch.randn_like(x)
        g = (torch.rand(shape[1], device=device) > 0.5).to(dtype)
        nbytes = x.numel() * x.element_size()
        dst = torch.empty_like(x)
        copy_s = bench(lambda: dst.copy_(x), device, reps)
        copy_bw = 2 * nbytes / copy_s
        case = f"{tuple(shape)} {str(dtype).replace('torch.', '')} channels_last"
        rows.append({"op": "copy", "case": case, "provider": "torch", "us": copy_s * 1e6, "floor_bytes": 2 * nbytes,
                     "GBps": copy_bw / 1e9, "of_copy": 1.0})
        for name, impl in provs.items():
            if "channel_gate" not in impl:
                continue
            fwd, bwd = impl["channel_gate"], impl["channel_gate_backward"]
            record("channel_gate forward", case, name, bench(lambda: fwd(x, g), device, reps), 2 * nbytes, copy_bw)
            record("channel_gate backward", case, name, bench(lambda: bwd(dy, x, g), device, reps), 3 * nbytes,
                   copy_bw)
            record("channel_gate full", case, name,
                   bench(lambda: (fwd(x, g), bwd(dy, x, g)), device, reps), 5 * nbytes, copy_bw)

    # whole-bank gates and penalty of a ResNet-50
    import torchvision

    model = torchvision.models.resnet50()
    pp.attach_gates(model, torch.randn(1, 3, 224, 224))
    bank = model.polarprune_bank.to(device)
    s = bank.scores.detach().clone()
    cm = bank.cost_model("macs")
    n = s.numel()
    dg = torch.randn_like(s)
    case = f"ResNet-50 bank, {n} gates, {cm.num_segments} segments, macs cost"
    for name, impl in provs.items():
        if "binary_gate" not in impl or "gate_penalty" not in impl:
            continue
        args = cm.op_args(device) + (1.0, 0.5, 20.0, 0.1, "bimodal", 1.0)
        record("bank gates + penalty forward", case, name,
               bench(lambda: (impl["binary_gate"](s, "identity", 1.0), impl["gate_penalty"](s, *args)), device,
                     reps), 3 * 4 * n, float("inf"))
        record("bank gates backward", case, name,
               bench(lambda: impl["binary_gate_backward"](dg, s, "identity", 1.0), device, reps), 2 * 4 * n,
               float("inf"))
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "providers": list(provs),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [f"# Kernel benchmark on {result['device']} ({result['date']}, torch {result['torch']})", "",
             "| op | case | provider | time (us) | GB/s | of copy |", "|---|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        frac = "" if r["of_copy"] == 0 else f"{100 * r['of_copy']:.0f}%"
        lines.append(f"| {r['op']} | {r['case']} | {r['provider']} | {r['us']:.1f} | {r['GBps']:.1f} | {frac} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--out", default=None, help="folder for the JSON and Markdown results")
    args = parser.parse_args(argv)
    result = run(args.quick)
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels-{result['device'].replace(' ', '_')}-{result['date']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
