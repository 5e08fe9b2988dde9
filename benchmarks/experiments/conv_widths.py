"""How a 3x3 convolution's time depends on its widths on this machine: the table behind the latency cost's misses.

One Conv2d (3x3, padding 1, no bias) on a 32x32 input, batch 32, timed alone (surgery.latency.layer_ms: median of
repeated calls, inference mode) for input and output widths of 4 to 32 channels.

    python benchmarks/experiments/conv_widths.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import _record  # noqa: E402
from polarprune_cuda.surgery.latency import device_name, layer_ms  # noqa: E402

WIDTHS = (4, 6, 8, 10, 12, 14, 16, 24, 32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    ms = [[layer_ms(nn.Conv2d(ci, co, 3, padding=1, bias=False).eval(),
                    torch.randn(args.batch, ci, args.size, args.size)) for co in args.widths] for ci in args.widths]
    device = device_name(torch.device("cpu"))
    lines = [f"# 3x3 convolution time (ms) by input (rows) and output (columns) channels ({device})", "",
             f"`{_record.command('conv_widths.py', argv)}`", "",
             f"Input {args.size}x{args.size}, batch {args.batch}; median of repeated calls.", "",
             "| in \\ out | " + " | ".join(map(str, args.widths)) + " |",
             "|---" * (len(args.widths) + 1) + "|"]
    lines += [f"| {ci} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for ci, row in zip(args.widths, ms)]
    record = {"command": _record.command("conv_widths.py", argv), "device": device, "widths": args.widths,
              "size": args.size, "batch": args.batch, "threads": torch.get_num_threads(), "ms": ms}
    _record.write(Path(args.out), f"conv-widths-{args.tag}", record, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
