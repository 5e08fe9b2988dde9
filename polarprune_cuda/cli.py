"""Command line: ``polarprune prune ...`` (also ``python -m polarprune_cuda prune ...``)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import typing
import warnings
from pathlib import Path

import torch

from ._io import file_in_the_way, write_text
from .train import data as data_mod
from .train import rundir
from .train.checkpoint import CheckpointError
from .train.config import PruneConfig

DEFAULTS = PruneConfig()
MAX_REPORT_BYTES = 64 * 2 ** 20
MAX_BATCH = PruneConfig.MAX_LATENCY_BATCH   # export --batch: one example batch, allocated whole (as --latency-batch)


class _Parser(argparse.ArgumentParser):
    """argparse with the rules of every other failure: one ``polarprune: error: ...`` line, exit code 2, and no
    abbreviated options (``--epoch`` is not ``--epochs``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    #: the command being parsed (set by main): the root parser's errors name its help too
    command: str | None = None

    def error(self, message: str):
        command = self.prog.split(" ", 1)[-1] if " " in self.prog else (self.command or "")
        hint = f" (polarprune {command} --help lists the options)" if command else " (polarprune --help)"
        self.exit(2, f"polarprune: error: {message}{hint}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="polarprune", description="One-pass structured pruning for PyTorch CNNs.")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("prune", help="train once with gates, extract the pruned network, write a report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _recipe_options(p)
    # the options that are not a field of PruneConfig, or map onto fields differently
    p.add_argument("--blocks", action="store_true",
                   help="also gate every residual block's branch; closed blocks are replaced by their shortcut")
    p.add_argument("--blocks-only", action="store_true", help="gate residual blocks only, no channel gates")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--baseline", action="store_true", help="also train the dense model with the same recipe")
    p.add_argument("--out", default=None, help="output folder (default runs/MODEL-DATASET-pSPARSITY)")
    p.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in an output folder that has a run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--interrupt-after-epoch", type=int, default=None, help=argparse.SUPPRESS)
    i = sub.add_parser("info", help="print the versions and which backend runs the gate ops where")
    i.add_argument("--json", action="store_true", help="the same as JSON")
    e = sub.add_parser("export", help="export a run's extracted model with torch.export (.pt2) or to ONNX",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("run", help="output folder of polarprune prune (holds report.json and model/)")
    e.add_argument("--format", default="pt2", choices=("pt2", "onnx"),
                   help="pt2: torch.export (the batch dimension dynamic); onnx: the dynamo exporter")
    e.add_argument("--out", default=None, help="file to write (default RUN/model.pt2 or RUN/model.onnx)")
    e.add_argument("--batch", type=int, default=2, help="batch of the example input (dim 0 stays dynamic)")
    e.add_argument("--model", default=None,
                   help="the dense model to rebuild (a built-in name or module:function); needed when the run used "
                        "module:function: a run folder never decides which code runs")
    return parser


def _recipe_fields() -> list:
    """PruneConfig's fields that are command-line options of their own (metadata ``flag`` not None)."""
    return [f for f in dataclasses.fields(PruneConfig) if f.metadata.get("flag", "") is not None]


def _option_type(annotation):
    """int, float, str or bool of a field's annotation (``X | None``, ``Optional[X]``: X)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else annotation


def _recipe_options(p: argparse.ArgumentParser) -> None:
    """One option per field of PruneConfig (flag, type, default, choices and help from the field)."""
    hints = typing.get_type_hints(PruneConfig)
    for f in _recipe_fields():
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        kind = _option_type(hints[f.name])
        kwargs = {"dest": f.name, "default": f.default}
        kwargs["help"] = (f.metadata.get("help") or "").replace("%", "%%")   # "" still shows the default
        if kind is bool:
            if f.default is not False:
                raise TypeError(f"PruneConfig.{f.name}: a bool option is a store_true flag and defaults to False")
            p.add_argument(flag, action="store_true", **kwargs)
            continue
        if kind is not str:
            kwargs["type"] = kind
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        p.add_argument(flag, **kwargs)


def _device(requested: str) -> str:
    """The ``--device`` option checked: auto, cpu, cuda or cuda:N, and a GPU where cuda is asked for."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {requested!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {requested!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {requested}: no GPU is visible to torch (torch.cuda.is_available() is "
                             "False); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {requested}: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return requested


def _check_cli_options(args) -> None:
    """The options that are not part of the recipe (PruneConfig.validate checks those)."""
    if args.interrupt_after_epoch is not None and args.interrupt_after_epoch < 1:
        raise ValueError(f"interrupt-after-epoch must be a positive int, got {args.interrupt_after_epoch}")
    if args.resume and args.overwrite:
        raise ValueError("resume and overwrite exclude each other: --resume continues the run in --out, "
                         "--overwrite starts it over")


def _config(args) -> PruneConfig:
    recipe = {f.name: getattr(args, f.name) for f in _recipe_fields()}
    return PruneConfig(**recipe, device=_device(args.device), blocks=args.blocks or args.blocks_only,
                       channel_gates=not args.blocks_only)


def planned_files(cfg: PruneConfig, baseline: bool) -> list[str]:
    """The files a run of ``cfg`` may write in its output folder (claimed in the manifest before writing)."""
    from .train.plots import plot_names

    files = ["checkpoint.pt"]
    if cfg.finetune_epochs:
        files.append("finetune.pt")
    if baseline:
        files.append("baseline.pt")
    files += ["model/weights.pt", "model/weights.pt.sha256"]
    files += ["model/spec.json"] if cfg.method == "polar" else ["model/sparse.pt", "model/sparse.pt.sha256"]
    files += ["report.json", "report.md", *plot_names(cfg.method)]
    return files


def prune(args, argv: list[str]) -> int:
    from .train import distributed as dist_mod

    _check_cli_options(args)
    cfg = _config(args)
    cfg.validate()
    info = dist_mod.setup(cfg.device)
    cfg.device = info.device
    if cfg.sync_bn and not info.enabled:
        warnings.warn("sync-bn acts only under torchrun (several processes); this run has one process")
    try:
        code = _prune(args, argv, cfg, info)
        if code == 0:   # the ranks leave together: rank 0 writes the report while the others wait, then the group
            dist_mod.barrier(info)   # is torn down with no rank gone (a rank leaving early was once seen to abort)
        return code
    finally:
        dist_mod.cleanup(info)


def default_out(cfg: PruneConfig) -> Path:
    method = "" if cfg.method == "polar" else f"-{cfg.method}"
    if cfg.blocks:
        method += "-blocks" if cfg.channel_gates else "-blocks-only"
    return Path(f"runs/{cfg.model.replace(':', '_')}-{cfg.dataset}{method}-p{round(100 * cfg.target_sparsity)}")


def _prune(args, argv: list[str], cfg, info) -> int:
    from .train import distributed as dist_mod

    out = Path(args.out) if args.out else default_out(cfg)
    try:   # the report names the folder: a path that is not text fails there, after the training (checked now)
        str(out.absolute()).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"out: {str(out)!r} is not valid UTF-8; the report and manifest name the folder: "
                         "choose an --out whose name is text") from None
    with contextlib.ExitStack() as stack:
        refusal = note = None
        if info.is_main:   # rank 0 holds the folder for the whole run; its answer decides on every rank
            try:
                stack.enter_context(rundir.locked(out, foreign_ok=False))
                note = rundir.RunFolder(out).prepare(resume=args.resume, overwrite=args.overwrite,
                                                     planned=planned_files(cfg, args.baseline))
            except rundir.RunFolderError as exc:
                refusal = str(exc)
        refusal = dist_mod.broadcast_object(info, refusal)
        if refusal is not None:
            raise rundir.RunFolderError(refusal)
        if note and info.is_main:
            print(f"polarprune: {note}", file=sys.stderr)
        return _train_and_report(args, argv, cfg, info, out)


def _train_and_report(args, argv, cfg, info, out: Path) -> int:
    from .train import distributed as dist_mod
    from .train import report as report_mod
    from .train.runs import run_prune

    try:
        dist_mod.barrier(info)
        result = run_prune(cfg, out, resume=args.resume, baseline=args.baseline, progress=not args.quiet,
                           interrupt_after=args.interrupt_after_epoch, dist_info=info)
    except Exception as exc:   # said where main() prints the one line: what the failed run left in its folder
        if info.is_main and not (out / "checkpoint.pt").is_file():
            exc.polarprune_left = (f"; nothing was trained: {out} holds only this run's manifest and lock, and "
                                   "the same command starts over there")
        raise
    except KeyboardInterrupt:
        if info.is_main:
            if (out / "checkpoint.pt").is_file():
                print(f"\npolarprune: interrupted. The last finished epoch is saved in {out / 'checkpoint.pt'}; "
                      "run the same command with --resume to continue.", file=sys.stderr)
            else:
                print("\npolarprune: interrupted before the first epoch finished: nothing was saved, run the "
                      "same command again to start over.", file=sys.stderr)
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


def _field(obj, key: str, kind, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{where} has no field {key!r}: not a report of polarprune prune")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}: field {key!r} must be {getattr(kind, '__name__', kind)}, "
                         f"got {type(value).__name__}")
    return value


def load_run(run, model: str | None = None, batch: int = 1) -> tuple:
    """(extracted model, shape of one input sample) of a ``polarprune prune`` output folder.

    The dense model is rebuilt from a built-in name, or from ``model`` (a name or ``module:function`` that the
    caller passes): nothing in the folder decides which code runs. A run that used ``module:function`` is
    refused unless ``model`` is given. ``batch``: the batch the caller will run it on, checked against
    MAX_INPUT_ELEMENTS before the model is built.
    """
    from .models import build_model, is_builtin
    from .surgery.inputs import MAX_INPUT_ELEMENTS
    from .surgery.spec import load_pruned

    run = Path(run)
    report_file = run / "report.json"
    if not report_file.is_file():
        raise FileNotFoundError(f"{report_file} not found: run must be an output folder of polarprune prune")
    if report_file.stat().st_size > MAX_REPORT_BYTES:
        raise ValueError(f"{report_file} has {report_file.stat().st_size} bytes, more than a report can have "
                         f"({MAX_REPORT_BYTES}): not a report of polarprune prune")
    try:
        report = json.loads(report_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{report_file} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(report, dict):
        raise ValueError(f"{report_file} must hold a JSON object (a report of polarprune prune), got "
                         f"{type(report).__name__}")
    method = report.get("method", "polar")
    if method != "polar":
        raise ValueError(f"run {run} used method {method!r}: its model has the dense shapes "
                         "(model/weights.pt); export the channel-pruned result of method polar")
    cfg = _field(report, "config", dict, str(report_file))
    saved = _field(cfg, "model", str, f"{report_file} config")
    num_classes = _field(_field(report, "data", dict, str(report_file)), "num_classes", int, f"{report_file} data")
    small_input = cfg.get("small_input", False)
    if not isinstance(small_input, bool):
        raise ValueError(f"{report_file} config: field 'small_input' must be true or false")
    if not 1 <= num_classes <= 1_000_000:
        raise ValueError(f"{report_file} data: field 'num_classes' must be in [1, 1000000], got {num_classes}")
    if model is None:
        if not is_builtin(saved):
            raise ValueError(
                f"run {run} was trained with model {saved!r}, which names code outside polarprune_cuda; a run "
                f"folder never decides which code runs: pass --model {saved} (API: model=) yourself if you "
                "trust that code")
        model = saved
    if not isinstance(model, str) or not model:
        raise TypeError(f"model must be a model name or module:function, got {model!r}")
    spec_file = run / "model" / "spec.json"
    spec = _read_spec_json(spec_file)
    in_channels = _in_channels(spec, spec_file)
    sample = spec["input_shapes"][0][1:]
    if batch * math.prod(sample) > MAX_INPUT_ELEMENTS:
        raise ValueError(f"batch: {batch} samples of shape {sample} are more than the {MAX_INPUT_ELEMENTS} "
                         "elements export traces with; lower --batch (the exported batch dimension stays dynamic)")
    def dense():
        return build_model(model, num_classes, in_channels, small_input)

    _check_classes(spec, spec_file, report_file, dense, num_classes)
    net = load_pruned(run / "model", dense)
    return net.eval(), tuple(net.polarprune_spec["input_shapes"][0][1:])


def _read_spec_json(spec_file: Path):
    """A run's spec.json as JSON (load_pruned validates it; this reads what is needed before the model is built)."""
    from .surgery.spec import MAX_SPEC_BYTES

    try:
        size = spec_file.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{spec_file} not found: the run has no extracted model") from None
    if size > MAX_SPEC_BYTES:
        raise ValueError(f"{spec_file} has {size} bytes, more than a channel spec has ({MAX_SPEC_BYTES} at most)")
    try:
        return json.loads(spec_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{spec_file} is not valid JSON ({type(exc).__name__})") from None


def _check_classes(spec, spec_file: Path, report_file: Path, build, num_classes: int) -> None:
    """The report's class count against the spec's classifier, with the dense model built on the meta device
    (no memory for its weights): a report naming 1,000,000 classes is refused before a model that size is made."""
    from .train.weights import classifier_name

    try:
        with torch.device("meta"):
            dense = build()
    except Exception:   # noqa: BLE001 - a builder that cannot run on meta: load_pruned's checks still follow
        return
    head = classifier_name(dense, num_classes)
    shapes = spec.get("shapes") if isinstance(spec, dict) else None
    got = shapes.get(f"{head}.weight") if head is not None and isinstance(shapes, dict) else None
    if isinstance(got, list) and got and got[0] != num_classes:
        raise ValueError(f"{report_file} data: num_classes is {num_classes}, the spec's classifier {head!r} has "
                         f"{got[0]} outputs ({spec_file.name}): the report and the spec disagree")


def _in_channels(spec, spec_file: Path) -> int:
    """The input channels recorded in a spec (load_pruned validates the rest of it)."""
    shapes = spec.get("input_shapes") if isinstance(spec, dict) else None
    first = shapes[0] if isinstance(shapes, list) and shapes else None
    if not (isinstance(first, list) and len(first) >= 2 and all(type(d) is int for d in first)
            and 1 <= first[1] <= 65536):
        raise ValueError(f"{spec_file}: field 'input_shapes' must be a list of input shapes [N, C, ...] with "
                         "1 <= C <= 65536")
    return first[1]


def _export_target(args) -> Path:
    out = Path(args.out) if args.out else Path(args.run) / f"model.{args.format}"
    if out.is_dir():
        raise ValueError(f"out: {out} is a folder; give the file to write, e.g. {out / ('model.' + args.format)}")
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise ValueError(f"out: {blocker} is a file, so {out} cannot be written")
    return out


def export(args) -> int:
    from .export import export_onnx, export_program

    if not 2 <= args.batch <= MAX_BATCH:
        raise ValueError(f"batch must be in [2, {MAX_BATCH}] (the exported batch dimension stays dynamic), got "
                         f"{args.batch}")
    out = _export_target(args)
    run = Path(args.run)
    owned = run.is_dir() and rundir.RunFolder(run).owned()
    inside = owned and out.resolve().parent == run.resolve()
    with rundir.locked(run) if owned else contextlib.nullcontext():   # not while a prune writes the folder
        model, sample_shape = load_run(run, model=args.model, batch=args.batch)
        x = torch.randn(args.batch, *sample_shape, generator=torch.Generator().manual_seed(0))
        preprocessing = model.polarprune_spec.get("preprocessing")   # checked by load_pruned
        prep = out.with_name(out.name + ".preprocessing.json") if preprocessing is not None else None
        if inside:
            names = [out.name, *([prep.name] if prep is not None else [])]
            rundir.RunFolder(run).refuse_unlisted(names)
            rundir.RunFolder(run).claim(*names)
        if args.format == "pt2":
            export_program(model, x, out)
        else:
            export_onnx(model, x, out)
        if prep is not None:   # what an input needs before the model: beside the file that runs it
            write_text(prep, json.dumps(preprocessing, indent=1))
    print(f"polarprune: wrote {out} (checked against eager on a batch of {args.batch})"
          + (f" and {prep.name}" if prep is not None else ""))
    return 0


TRAIN_EXTRA = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}


def _message(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in TRAIN_EXTRA:
        return (f"polarprune needs {TRAIN_EXTRA[exc.name.split('.')[0]]} for this (the application's "
                "dependencies): pip install 'polarprune_cuda[train]'")
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    if isinstance(exc, MemoryError):
        return "out of memory"
    if isinstance(exc, (ValueError, TypeError, FileNotFoundError, CheckpointError, data_mod.DatasetNotFoundError)):
        return str(exc)
    return (f"{type(exc).__name__}: {exc} (unexpected; set POLARPRUNE_DEBUG=1 to see the traceback and please "
            "report it)")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"polarprune: warning: {message}", file=sys.stderr if file is None else file)


def info_text(found: dict) -> str:
    """``polarprune info`` for a reader: the versions, then one line per backend saying whether it can run here
    and why (an installed CUDA extension on a machine without a GPU is said to be that, not "available")."""
    b = found["backends"]
    gpu = b["cuda_device_available"]
    lines = [f"{k:16} {v}" for k, v in found["versions"].items()]
    lines += ["", f"CUDA device      {'yes' if gpu else 'none on this machine (CPU tensors use the torch backend)'}",
              f"forced backend   {b['forced'] or '-'} (POLARPRUNE_BACKEND)", "", "backend  runs here  why"]
    for name, entry in b["backends"].items():
        if name == "torch":
            state = "yes"
        elif not entry["available"]:
            state = "no"
        else:
            state = "yes" if gpu else "no GPU"
        reason = entry["reason"] + ("; installed, but there is no CUDA device to run it"
                                    if state == "no GPU" else "")
        lines.append(f"{name:8} {state:10} {reason}")
    lines += ["", "the gate ops run on: " + ", ".join(f"{dev} tensors -> {name}" for dev, name in b["selected"].items()
                                                    if dev == "cpu" or gpu)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    parser.command = argv[0] if argv and argv[0] in ("prune", "export", "info") else None
    args = parser.parse_args(argv or ["prune"])
    if args.command is None:
        args = parser.parse_args(["prune"])
    if args.command == "info":
        from .ops.backends import backend_info
        from .train.report import versions

        found = {"versions": versions(), "backends": backend_info()}
        print(json.dumps(found, indent=1) if args.json else info_text(found))
        return 0
    command = {"prune": lambda: prune(args, argv), "export": lambda: export(args)}.get(args.command)
    if command is None:
        parser.print_help()
        return 2
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return command()
    except KeyboardInterrupt:
        print("\npolarprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:   # every failure is one line, never a traceback
        if os.environ.get("POLARPRUNE_DEBUG"):
            raise
        if os.environ.get("RANK", "0") == "0":   # under torchrun every rank fails alike: rank 0 says it
            print(f"polarprune: error: {_message(exc)}{getattr(exc, 'polarprune_left', '')}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
