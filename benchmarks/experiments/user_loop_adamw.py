"""Dense training with AdamW against the one pass with AdamW, both in a plain user loop (OnePass), same budget.

    python benchmarks/experiments/user_loop_adamw.py [--dataset fashion-mnist --max-train 12000 --epochs 6 --seeds 0 1 2]

ResNet-20, batch 128, AdamW (lr 1e-3, weight decay 0.05), cosine schedule over the run; the one pass removes 50%
of the MACs (OnePass defaults: warm-up 1/12, ramp 1/6, freeze at 0.3, then the extracted network trains), its
gate group at ``--gate-c / window`` (benchmarks/results/gate-lr-adamw-digits.md). The arms run one after the
other per seed on one machine. Reported: test accuracy (the extracted network for the one pass), MACs removed,
the training steps' wall time, the whole arm's time. Results: benchmarks/results/user-loop-adamw-<stem>.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import copy

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[2]

import _record  # noqa: E402
import polarprune_cuda as pp  # noqa: E402
from polarprune_cuda.models import build_model  # noqa: E402
from polarprune_cuda.train import data as data_mod  # noqa: E402
from polarprune_cuda.train.loop import evaluate  # noqa: E402
from polarprune_cuda.train.onepass import FREEZE, WARMUP  # noqa: E402


def arm(data, one_pass: bool, seed: int, epochs: int, batch: int, gate_c: float, target: float,
        freeze_at: float = FREEZE, scratch: nn.Module | None = None, onepass_kw: dict | None = None,
        gate_betas: tuple | None = None, reset_at_switch: bool = False, tail: bool = False,
        ste: str = "identity") -> dict:
    """One training run: dense (``one_pass`` False), the one pass, or ``scratch`` (an architecture, its weights
    drawn anew from ``seed``) trained densely; ``tail``: only the steps after the freeze (the schedule and the
    data of the first ``freeze_at`` of the run skipped), as the one pass trains its extracted network."""
    t_arm = time.perf_counter()
    torch.manual_seed(seed)
    example = data.example_input(1)
    if scratch is not None:
        model = copy.deepcopy(scratch)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    else:
        model = build_model("resnet20", data.num_classes, data.train_x.shape[1], False)
    steps = epochs * data_mod.num_batches(len(data.train_y), batch)
    pruner = None
    if one_pass:
        pp.attach_gates(model, example, min_channels=4, ste=ste)
        weights, scores = pp.split_parameters(model)
        window = int(freeze_at * steps) - int(round(WARMUP * steps))
        groups = [{"params": weights}, {"params": scores, "lr": gate_c / window, "weight_decay": 0.0,
                                        **({"betas": tuple(gate_betas)} if gate_betas else {})}]
    else:
        groups = [{"params": list(model.parameters())}]
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    if one_pass:
        pruner = pp.OnePass(model, example, target, steps, opt, sched, cost="macs", freeze_at=freeze_at,
                            **(onepass_kw or {}))
    net = (lambda: pruner.model) if one_pass else (lambda: model)  # noqa: E731
    train_s = 0.0
    skip = int(freeze_at * steps) if tail else 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(epochs):
            t0 = time.perf_counter()
            net().train()
            for x, y in data_mod.batches(data.train_x, data.train_y, batch, seed=seed, epoch=epoch, pad=data.pad,
                                         flip=data.flip):
                if skip:
                    skip -= 1
                    sched.step()
                    continue
                loss = F.cross_entropy(net()(x), y)
                if one_pass:
                    loss = loss + pruner.penalty()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if one_pass:
                    was = pruner.switched
                    pruner.step()
                    if reset_at_switch and pruner.switched and not was:
                        opt.state.clear()   # the weights' state starts afresh on the extracted network
            train_s += time.perf_counter() - t0
    final = pruner.finish() if one_pass else model
    acc = evaluate(final, data.test_x, data.test_y)
    dense = pp.count(build_model("resnet20", data.num_classes, data.train_x.shape[1], False), example)
    got = pp.count(final, example)
    name = "one-pass" if one_pass else ("dense" if scratch is None else "from-scratch" + ("-tail" if tail else ""))
    return {"arm": name, "seed": seed,
            "final": final if one_pass else None, "accuracy": acc,
            "macs_removed": 1 - got["macs"] / dense["macs"], "params_removed": 1 - got["params"] / dense["params"],
            "train_seconds": train_s, "arm_seconds": time.perf_counter() - t_arm, "steps": steps,
            "polarized_at_freeze": pruner.polarized_at_freeze if one_pass else None,
            "warnings": sorted({str(w.message)[:200] for w in caught})}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-train", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--gate-c", type=float, default=64.0)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--freeze-at", type=float, default=FREEZE, help="fraction of the run where the gates freeze")
    p.add_argument("--arms", nargs="+", default=["dense", "one-pass"],
                   choices=["dense", "one-pass", "from-scratch", "from-scratch-tail"],
                   help="from-scratch: the one pass's extracted architecture of the same seed, weights drawn anew, "
                        "trained densely (needs one-pass before it); from-scratch-tail: the same for the steps after "
                        "the freeze only")
    p.add_argument("--target-weight", type=float, default=None, help="OnePass target_weight (default its own)")
    p.add_argument("--polarization-weight", type=float, default=None, help="OnePass polarization_weight")
    p.add_argument("--gate-betas", type=float, nargs=2, default=None, help="the gate group's AdamW betas")
    p.add_argument("--reset-at-switch", action="store_true", help="clear the optimizer's state at the switch "
                   "instead of carrying it")
    p.add_argument("--ste", default="identity", choices=["identity", "clipped", "sigmoid"], help="the gates' "
                   "straight-through estimator")
    p.add_argument("--no-restart-schedule", action="store_true", help="OnePass restart_schedule=False: the "
                   "cosine runs on through the freeze (every row of the record before the restart was measured so)")
    p.add_argument("--keep-gated", action="store_true", help="OnePass switch=False: the gated network to the end")
    p.add_argument("--stem", default="fashion-12k")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    data = data_mod.load_dataset(args.dataset, args.data_dir, max_train=args.max_train)
    kw = {k: v for k, v in (("target_weight", args.target_weight),
                            ("polarization_weight", args.polarization_weight)) if v is not None}
    if args.keep_gated:
        kw["switch"] = False
    if args.no_restart_schedule:
        kw["restart_schedule"] = False
    rows = []
    for seed in args.seeds:
        final = None
        for name in args.arms:
            if name.startswith("from-scratch") and final is None:
                p.error("--arms: from-scratch needs one-pass before it")
            rows.append(arm(data, name == "one-pass", seed, args.epochs, args.batch, args.gate_c, args.target,
                            args.freeze_at, scratch=final if name.startswith("from-scratch") else None, onepass_kw=kw,
                            tail=name == "from-scratch-tail",
                            gate_betas=args.gate_betas, reset_at_switch=args.reset_at_switch, ste=args.ste))
            r = rows[-1]
            final = r.pop("final") or final
            print(f"{r['arm']} seed {seed}: accuracy {r['accuracy']:.4f}, MACs removed {r['macs_removed']:.4f}, "
                  f"steps {r['train_seconds']:.0f} s, arm {r['arm_seconds']:.0f} s", flush=True)
    lines = ["| arm | accuracy (mean ± sd) | per seed | MACs removed | params removed | training steps' time | "
             "arm time | polarized at freeze |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for name in args.arms:
        rs = [r for r in rows if r["arm"] == name]
        acc = [100 * r["accuracy"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        pol = [r["polarized_at_freeze"] for r in rs if r["polarized_at_freeze"] is not None]
        lines.append(f"| {name} | {statistics.mean(acc):.2f} ± {sd:.2f} | {', '.join(f'{a:.2f}' for a in acc)} | "
                     f"{statistics.mean(r['macs_removed'] for r in rs):.1%} | "
                     f"{statistics.mean(r['params_removed'] for r in rs):.1%} | "
                     f"{statistics.mean(r['train_seconds'] for r in rs):.0f} s | "
                     f"{statistics.mean(r['arm_seconds'] for r in rs):.0f} s | "
                     f"{f'{statistics.mean(pol):.3f}' if pol else '-'} |")
    cmd = _record.command("user_loop_adamw.py", argv)
    text = (f"# Dense against the one pass, both with AdamW in a user loop: resnet20 on {args.dataset}"
            f" ({args.max_train} training images)\n\nCommand: `{cmd}`  \n"
            f"{args.epochs} epochs, batch {args.batch}, AdamW lr 1e-3, weight decay 0.05, cosine; one pass at "
            f"{args.target:.0%} of MACs, gate lr {args.gate_c:g} / window, freeze at {args.freeze_at:g}"
            f"{''.join(f', {k} {v}' for k, v in kw.items())}"
            f"{f', gate betas {tuple(args.gate_betas)}' if args.gate_betas else ''}"
            f"{', optimizer state cleared at the switch' if args.reset_at_switch else ''}"
            f"{f', ste {args.ste}' if args.ste != 'identity' else ''}"
            f", the schedule {'running on through' if args.no_restart_schedule else 'restarted at'} the freeze; "
            f"seeds {args.seeds}; accuracy on the full test set. CPU, {torch.get_num_threads()} threads, the arms "
            "one after the other.\n\n" + "\n".join(lines) + "\n")
    _record.write(args.out, f"user-loop-adamw-{args.stem}", {"command": cmd, "rows": rows}, text)
    return rows


if __name__ == "__main__":
    main()
