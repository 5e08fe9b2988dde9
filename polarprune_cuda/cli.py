"""Command line: ``polarprune prune ...`` (also ``python -m polarprune_cuda prune ...``)."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from . import data as data_mod
from .trainer import METHODS, RAMP_FRACTION, WARMUP_FRACTION, CheckpointError, PruneConfig

DEFAULTS = PruneConfig()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polarprune", description="One-pass structured pruning for PyTorch CNNs.")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("prune", help="train once with gates, extract the pruned network, write a report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULTS.model,
                   help="resnet20/32/44/56/110 (CIFAR-style), resnet18/34/50 (torchvision) or module:function")
    p.add_argument("--dataset", default=DEFAULTS.dataset, choices=data_mod.DATASETS)
    p.add_argument("--data-dir", default=None, help="folder with the data set's files (nothing is downloaded)")
    p.add_argument("--method", default=DEFAULTS.method, choices=METHODS,
                   help="polar: one-pass channel pruning with gates (a smaller, faster network); fggp, gmp, "
                        "annealed: gradual unstructured weight pruning (zeros, a smaller sparse copy)")
    p.add_argument("--target-sparsity", type=float, default=DEFAULTS.target_sparsity,
                   help="fraction of the cost to remove, in [0, 1) (unstructured methods: of the weights, in (0, 1))")
    p.add_argument("--cost", default=DEFAULTS.cost, choices=("channels", "params", "macs"))
    p.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help="weights' learning rate (cosine decay)")
    p.add_argument("--momentum", type=float, default=DEFAULTS.momentum)
    p.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    p.add_argument("--label-smoothing", type=float, default=DEFAULTS.label_smoothing)
    p.add_argument("--gate-lr", type=float, default=DEFAULTS.gate_lr,
                   help="gate scores' learning rate, times n_gates / target_weight")
    p.add_argument("--target-weight", type=float, default=DEFAULTS.target_weight)
    p.add_argument("--polarization-weight", type=float, default=DEFAULTS.polarization_weight)
    p.add_argument("--polarization", default=DEFAULTS.polarization, choices=("bimodal", "zhuang"))
    p.add_argument("--warmup-epochs", type=float, default=DEFAULTS.warmup_epochs,
                   help="epochs without the penalty at the start; None (unset): "
                        f"{100 * WARMUP_FRACTION:.0f}%% of --epochs")
    p.add_argument("--ramp-epochs", type=float, default=DEFAULTS.ramp_epochs,
                   help="epochs over which the penalty weight ramps to its full value; None (unset): "
                        f"{100 * RAMP_FRACTION:.0f}%% of --epochs")
    p.add_argument("--freeze-gates-at", type=float, default=DEFAULTS.freeze_gates_at,
                   help="fraction of training after which the gates stop moving and the weights settle")
    p.add_argument("--score-init", type=float, default=DEFAULTS.score_init,
                   help="initial gate score (gate probability sigmoid(score-init))")
    p.add_argument("--ste", default=DEFAULTS.ste, choices=("identity", "clipped", "sigmoid"),
                   help="straight-through estimator of the hard gates' gradient")
    p.add_argument("--target-control", default=DEFAULTS.target_control, choices=("penalty", "dual"),
                   help="penalty: fixed-weight quadratic density term; dual: its target moved by dual ascent")
    p.add_argument("--dual-lr", type=float, default=DEFAULTS.dual_lr, help="step of the dual ascent")
    p.add_argument("--freeze-lr-scale", type=float, default=DEFAULTS.freeze_lr_scale,
                   help="weights' learning rate after the gates freeze, times the cosine schedule's")
    p.add_argument("--blocks", action="store_true",
                   help="also gate every residual block's branch; closed blocks are replaced by their shortcut")
    p.add_argument("--blocks-only", action="store_true", help="gate residual blocks only, no channel gates")
    p.add_argument("--min-channels", type=int, default=DEFAULTS.min_channels)
    p.add_argument("--round-to", type=int, default=None)
    p.add_argument("--update-every", type=int, default=None,
                   help="unstructured methods: steps between mask updates (default: 50 updates over 80%% of the run)")
    p.add_argument("--select-ratio", type=float, default=DEFAULTS.select_ratio,
                   help="fggp: fraction of the remaining weights that are gradient candidates")
    p.add_argument("--start", default=DEFAULTS.start, choices=("dense", "erk50"),
                   help="unstructured methods: dense start, or a random ERK mask at 50%% density")
    p.add_argument("--finetune-epochs", type=int, default=0, help="optional fine-tuning of the extracted model")
    p.add_argument("--baseline", action="store_true", help="also train the dense model with the same recipe")
    p.add_argument("--init", default=None, help="state_dict (.pt) of pretrained dense weights to start from")
    p.add_argument("--small-input", action="store_true", help="3x3 stride-1 stem for torchvision ResNets")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--amp", default=None, choices=("bf16", "fp16"),
                   help="mixed precision: autocast to bf16 or fp16 (fp16 adds a grad scaler)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for weights and activations")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch (the result of one process)")
    p.add_argument("--max-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--max-test", type=int, default=None, help="use only the first N test images")
    p.add_argument("--latency-batch", type=int, default=32)
    p.add_argument("--out", default=None, help="output folder (default runs/MODEL-DATASET-pSPARSITY)")
    p.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in an output folder that has a run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--interrupt-after-epoch", type=int, default=None, help=argparse.SUPPRESS)
    sub.add_parser("info", help="print the backends and versions")
    e = sub.add_parser("export", help="export a run's extracted model with torch.export (.pt2) or to ONNX",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("run", help="output folder of polarprune prune (holds report.json and model/)")
    e.add_argument("--format", default="pt2", choices=("pt2", "onnx"))
    e.add_argument("--out", default=None, help="file to write (default RUN/model.pt2 or RUN/model.onnx)")
    e.add_argument("--batch", type=int, default=2, help="batch of the example input (dim 0 stays dynamic)")
    return parser


def _config(args) -> PruneConfig:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return PruneConfig(
        model=args.model, dataset=args.dataset, target_sparsity=args.target_sparsity, cost=args.cost,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, gate_lr=args.gate_lr,
        target_weight=args.target_weight, polarization_weight=args.polarization_weight,
        polarization=args.polarization, warmup_epochs=args.warmup_epochs, ramp_epochs=args.ramp_epochs,
        freeze_gates_at=args.freeze_gates_at, score_init=args.score_init, ste=args.ste,
        target_control=args.target_control, dual_lr=args.dual_lr, freeze_lr_scale=args.freeze_lr_scale,
        min_channels=args.min_channels, round_to=args.round_to,
        finetune_epochs=args.finetune_epochs, seed=args.seed, small_input=args.small_input, init=args.init,
        max_train=args.max_train, max_test=args.max_test, data_dir=args.data_dir, device=device,
        method=args.method, update_every=args.update_every, select_ratio=args.select_ratio, start=args.start,
        blocks=args.blocks or args.blocks_only, channel_gates=not args.blocks_only, amp=args.amp,
        channels_last=args.channels_last, sync_bn=args.sync_bn)


def prune(args, argv: list[str]) -> int:
    from . import distributed as dist_mod

    cfg = _config(args)
    cfg.validate()
    info = dist_mod.setup(cfg.device)
    cfg.device = info.device
    try:
        return _prune(args, argv, cfg, info)
    finally:
        dist_mod.cleanup(info)


def _prune(args, argv: list[str], cfg, info) -> int:
    from . import distributed as dist_mod
    from . import report as report_mod
    from .trainer import run_prune

    method = "" if cfg.method == "polar" else f"-{cfg.method}"
    if cfg.blocks:
        method += "-blocks" if cfg.channel_gates else "-blocks-only"
    out = Path(args.out or f"runs/{cfg.model.replace(':', '_')}-{cfg.dataset}{method}-p{round(100 * cfg.target_sparsity)}")
    has_run = (out / "checkpoint.pt").exists() or (out / "report.json").exists()
    has_run = dist_mod.broadcast_object(info, has_run)   # rank 0's folder decides, on every rank
    if has_run and not (args.resume or args.overwrite):
        if info.is_main:
            print(f"polarprune: {out} already holds a run; pass --resume to continue it, --overwrite to start "
                  "over, or choose another --out", file=sys.stderr)
        return 2
    dist_mod.barrier(info)   # every rank has looked before rank 0 clears the folder
    if args.overwrite and out.exists() and not args.resume and info.is_main:
        for name in ("checkpoint.pt", "finetune.pt", "baseline.pt", "report.json", "report.md"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "model", ignore_errors=True)
    try:
        dist_mod.barrier(info)
        result = run_prune(cfg, out, resume=args.resume, baseline=args.baseline, progress=not args.quiet,
                           interrupt_after=args.interrupt_after_epoch, dist_info=info)
    except KeyboardInterrupt:
        if info.is_main:
            print(f"\npolarprune: interrupted. The last finished epoch is saved in {out / 'checkpoint.pt'}; "
                  f"run the same command with --resume to continue.", file=sys.stderr)
        return 130
    if not info.is_main:
        return 0
    example = result.data.example_input(args.latency_batch).to(cfg.device)
    models = {"dense": result.dense_model, "pruned": result.pruned_model}
    latency = report_mod.latency_side_by_side(models, example)
    energy = report_mod.energy_side_by_side(models, example)
    report = report_mod.build_report(result, ["polarprune", *argv], latency, energy, args.latency_batch)
    report["processes"] = info.world_size
    report_mod.write(report, out)
    print()
    report_mod.print_table(report)
    print(f"\nreport: {out / 'report.md'}  model: {out / 'model'}")
    return 0


def load_run(run) -> tuple:
    """(extracted model, shape of one input sample) of a ``polarprune prune`` output folder."""
    from .models import build_model
    from .surgery import load_pruned

    run = Path(run)
    report_file = run / "report.json"
    if not report_file.is_file():
        raise FileNotFoundError(f"{report_file} not found: run must be an output folder of polarprune prune")
    report = json.loads(report_file.read_text())
    if report.get("method", "polar") != "polar":
        raise ValueError(f"run {run} used method {report['method']}: its model has the dense shapes "
                         "(model/weights.pt); export the channel-pruned result of method polar")
    cfg = report["config"]
    spec = json.loads((run / "model" / "spec.json").read_text())
    in_channels = spec["input_shapes"][0][1]
    model = load_pruned(run / "model", lambda: build_model(cfg["model"], report["data"]["num_classes"], in_channels,
                                                           cfg.get("small_input", False)))
    return model.eval(), tuple(spec["input_shapes"][0][1:])


def export(args) -> int:
    from .export import export_onnx, export_program

    if args.batch < 2:
        raise ValueError(f"batch must be >= 2 (the exported batch dimension stays dynamic), got {args.batch}")
    model, sample_shape = load_run(args.run)
    x = torch.randn(args.batch, *sample_shape, generator=torch.Generator().manual_seed(0))
    out = Path(args.out or Path(args.run) / f"model.{args.format}")
    if args.format == "pt2":
        export_program(model, x, out)
    else:
        export_onnx(model, x, out)
    print(f"polarprune: wrote {out} (checked against eager on a batch of {args.batch})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv or ["prune"])
    if args.command in (None, "prune"):
        if args.command is None:
            args = parser.parse_args(["prune"])
        try:
            return prune(args, argv)
        except (ValueError, TypeError, data_mod.DatasetNotFoundError, CheckpointError) as exc:
            print(f"polarprune: error: {exc}", file=sys.stderr)
            return 2
    if args.command == "export":
        try:
            return export(args)
        except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
            print(f"polarprune: error: {exc}", file=sys.stderr)
            return 2
    if args.command == "info":
        from . import backend_info
        from .report import versions

        print(json.dumps({"versions": versions(), "backends": backend_info()}, indent=1))
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
