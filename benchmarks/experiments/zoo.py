"""The model zoo: every torchvision classification model and a list of timm CNNs, gated, extracted and reloaded.

    .venv/bin/python benchmarks/experiments/zoo.py                       # every model (CPU: about an hour)
    .venv/bin/python benchmarks/experiments/zoo.py --models densenet121 timm:ghostnet_100
    .venv/bin/python benchmarks/experiments/zoo.py --quick               # the models tests/surgery/test_zoo.py runs

Per model (random weights and BatchNorm statistics, nothing downloaded, one thread):
``attach_gates(on_unsupported="skip")``, 30-60% of every group's gates closed (seeded), ``extract``
(which compares the eval outputs itself), the relative output difference, params and MACs counted on
the extracted model against ``predicted_count``, ``save_pruned`` / ``load_pruned`` and the reloaded
outputs compared bit for bit. The result is ``exact`` (with the number of groups left ungated and why),
``refused`` (an UnsupportedModelError naming what and why) or ``error`` (any other exception: a bug).
Beside it, Torch-Pruning alone: ``MetaPruner`` at a 50% ratio with magnitude importance, ``step()``,
one forward pass. Each column of each model runs in a child process with a time limit (``--timeout``),
``--jobs`` models at a time; the seconds are wall time on a shared machine, not a speed claim. Writes
benchmarks/results/zoo-<device>-<date>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _record  # noqa: E402

RESULTS = HERE.parent / "results"

#: timm CNNs (random weights only): the families users bring beside torchvision's
TIMM = ("resnet26d", "efficientnet_lite0", "repvgg_a0", "ghostnet_100", "cspresnet50", "rexnet_100",
        "mobilenetv3_small_100", "regnetx_002", "dla34", "mixnet_s", "resnest14d", "res2net50_14w_8s",
        "dpn68", "hrnet_w18_small", "vit_tiny_patch16_224", "convnext_atto")
#: what tests/surgery/test_zoo.py runs in `make test` (small and quick ones, and every kind of outcome)
QUICK = ("tv:densenet121", "tv:mnasnet0_5", "timm:efficientnet_lite0", "timm:repvgg_a0", "timm:ghostnet_100",
         "timm:cspresnet50", "tv:shufflenet_v2_x0_5", "tv:resnet18", "tv:mobilenet_v3_small",
         "tv:squeezenet1_1", "timm:rexnet_100", "timm:vit_tiny_patch16_224")
#: input side per model where 64 does not do (fixed patch grids and windows, deep stems)
SIZES = {"inception_v3": 96, "googlenet": 64, "vit_b_16": 224, "vit_b_32": 224, "vit_l_16": 224, "vit_l_32": 224,
         "vit_h_14": 224, "swin_t": 224, "swin_s": 224, "swin_b": 224, "swin_v2_t": 256, "swin_v2_s": 256,
         "swin_v2_b": 256, "maxvit_t": 224, "vit_tiny_patch16_224": 224}
TIMEOUT = 600


def torchvision_models() -> list[str]:
    """Every classification model constructor of torchvision (its own list)."""
    import torchvision

    return [f"tv:{name}" for name in torchvision.models.list_models(module=torchvision.models)]


def all_models() -> list[str]:
    return torchvision_models() + [f"timm:{name}" for name in TIMM]


def build(key: str):
    """The dense model of ``tv:NAME`` or ``timm:NAME`` with random weights (seeded), in eval mode."""
    import torch

    source, name = key.split(":", 1)
    torch.manual_seed(0)
    if source == "tv":
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
    elif source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
    else:
        raise ValueError(f"model must be tv:NAME or timm:NAME, got {key!r}")
    return model.eval()


def _randomise(model, gen) -> None:
    """BatchNorm statistics and affine away from their defaults, so a wrong channel shows."""
    import torch

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def _close_gates(bank, gen) -> None:
    """Close 30-60% of every segment's gates (a seeded choice)."""
    import torch

    with torch.no_grad():
        scores = torch.ones_like(bank.scores)
        for offset, size in zip(bank.offsets, bank.sizes):
            share = 0.3 + 0.3 * torch.rand(1, generator=gen).item()
            closed = torch.randperm(size, generator=gen)[: int(share * size)]
            scores[offset + closed] = -1.0
        bank.scores.copy_(scores)


def _skipped(caught) -> list[str]:
    """The groups attach_gates' warning lists as left ungated."""
    for w in caught:
        text = str(w.message)
        if text.startswith("attach_gates leaves"):
            return [line[4:] for line in text.splitlines()[1:] if line.startswith("  - ")]
    return []


def polarprune(key: str, size: int) -> dict:
    """attach (skip), close, extract, count, save and load one model; the outcome and what was measured."""
    import torch

    import polarprune_cuda as pp
    from polarprune_cuda.errors import UnsupportedModelError

    gen = torch.Generator().manual_seed(1)
    model = build(key)
    _randomise(model, gen)
    x = torch.randn(2, 3, size, size, generator=gen)
    row: dict = {"input": [2, 3, size, size]}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pp.attach_gates(model, x, on_unsupported="skip")
        row["skipped"] = _skipped(caught)
        bank = pp.find_bank(model)
        row["segments"], row["gates"] = len(bank.sizes), int(bank.scores.numel())
        _close_gates(bank, gen)
        with torch.no_grad():
            ref = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small = pp.extract(model, x)
        with torch.no_grad():
            out = small(x)
        row["rel_diff"] = float((out - ref).abs().max() / ref.abs().max())
        counted, predicted = pp.count(small, x), pp.predicted_count(model)
        row["params"] = [pp.count(build(key), x)["params"], counted["params"]]
        row["count_equals_prediction"] = counted == predicted
        with tempfile.TemporaryDirectory() as folder:
            pp.save_pruned(small, folder)
            loaded = pp.load_pruned(folder, lambda: build(key))
            with torch.no_grad():
                row["reload_equal"] = bool(torch.equal(loaded.eval()(x), out))
        exact = row["rel_diff"] <= 1e-4 and row["count_equals_prediction"] and row["reload_equal"]
        row["result"] = "exact" if exact else "error"
        if not exact:
            row["reason"] = "outputs, counts or the reloaded model differ"
    except UnsupportedModelError as exc:
        row.update(result="refused", reason=str(exc))
    except Exception as exc:   # anything else is a defect of polarprune
        row.update(result="error", reason=f"{type(exc).__name__}: {exc}")
    return row


def torch_pruning_alone(key: str, size: int) -> dict:
    """Torch-Pruning by itself: MetaPruner at ratio 0.5 (magnitude), one step, one forward pass."""
    import torch
    import torch_pruning as tp

    model = build(key)
    x = torch.randn(2, 3, size, size)
    try:
        with torch.no_grad():
            classes = model(x).shape[-1]
        heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == classes]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                          pruning_ratio=0.5, ignored_layers=heads)
            pruner.step()
        with torch.no_grad():
            model(x)
        return {"result": "pruned"}
    except Exception as exc:
        return {"result": "crash", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}


def _size(key: str) -> int:
    return SIZES.get(key.split(":", 1)[1], 64)


def run_one(key: str, with_tp: bool = True) -> dict:
    """Both columns for one model, in this process (its thread count as it is: the child sets one thread)."""
    start = time.perf_counter()
    row = {"model": key, **polarprune(key, _size(key))}
    row["seconds"] = round(time.perf_counter() - start, 1)
    if with_tp:
        row["torch_pruning"] = run_tp(key)
    return row


def run_tp(key: str) -> dict:
    start = time.perf_counter()
    row = torch_pruning_alone(key, _size(key))
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _child(args: list[str], timeout: float) -> tuple[dict | None, str]:
    """Run this script with ``args`` in a child process (one thread); its JSON row, or None and why not."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"no result within {timeout:.0f} s"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"child exited {done.returncode}: {tail[0][:300]}"
    return json.loads(lines[-1]), ""


def run_isolated(key: str, timeout: float, with_tp: bool = True) -> dict:
    """Each column for one model in a child process of its own, each with ``timeout``: a hang or a crash
    of one model is that model's row."""
    start = time.perf_counter()
    row, why = _child(["--one", key, "--no-tp"], timeout)
    if row is None:
        kind = "timeout" if why.startswith("no result") else "error"
        row = {"model": key, "result": kind, "reason": why, "seconds": round(time.perf_counter() - start, 1)}
    if with_tp:
        tp_row, why = _child(["--tp-only", key], timeout)
        row["torch_pruning"] = tp_row or {"result": "timeout" if why.startswith("no result") else "crash",
                                          "reason": why}
    return row


def _short(reason: str) -> str:
    first = (reason.splitlines() or [""])[0]
    return first if len(first) <= 160 else first[:157] + "..."


def markdown(res: dict) -> str:
    rows = res["rows"]
    n = len(rows)
    exact = [r for r in rows if r["result"] == "exact"]
    whole = [r for r in exact if not r.get("skipped")]
    refused = [r for r in rows if r["result"] == "refused"]
    other = [r for r in rows if r["result"] not in ("exact", "refused", "not run")]
    not_run = [r for r in rows if r["result"] == "not run"]
    tp_ok = sum(1 for r in rows if r.get("torch_pruning", {}).get("result") == "pruned")
    lines = [f"# Model zoo: attach, close, extract, count, save, load ({res['date']}, {res['machine']})", "",
             f"Command: `{res['command']}`", "",
             f"{n} models: **{len(exact)} exact** ({len(whole)} with every group gated, {len(exact) - len(whole)} "
             f"with some groups left ungated by name), {len(refused)} refused by name, {len(other)} other "
             f"(error or timeout)" + (f", {len(not_run)} not run yet" if not_run else "") + ". Torch-Pruning "
             f"alone (MetaPruner, 50%, one forward pass): {tp_ok} of {n} pruned.",
             "", "| model | polarprune | groups gated / skipped | max rel. diff | params dense -> extracted | s "
             "| Torch-Pruning alone | reason (refused, skipped, crashed) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tpr = r.get("torch_pruning", {})
        gated = f"{r.get('segments', 0)} / {len(r.get('skipped', []))}" if "segments" in r else ""
        diff = f"{r['rel_diff']:.1e}" if "rel_diff" in r else ""
        params = f"{r['params'][0]:,} -> {r['params'][1]:,}" if "params" in r else ""
        why = r.get("reason") or (r["skipped"][0] if r.get("skipped") else "") or tpr.get("reason", "")
        if r.get("reason", "").startswith("no channel group of the model can be gated") or \
                r.get("reason", "").endswith("cannot be gated:"):
            why = r["reason"].splitlines()[1].strip() if len(r["reason"].splitlines()) > 1 else why
        lines.append(f"| {r['model']} | {r['result']} | {gated} | {diff} | {params} | {r.get('seconds', '')} | "
                     f"{tpr.get('result', '')} | {_short(why).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _run_all(models: list[str], timeout: float, with_tp: bool, jobs: int, work: Path | None = None,
             collect: bool = False) -> list[dict]:
    """Every model's row, in the order given, ``jobs`` at a time; a line on stderr as each ends. With
    ``work``, each row is kept there as it ends (``<model>.json``) and read back instead of run again, so
    an interrupted run loses nothing; ``collect`` only reads them (a model not run yet: ``not run``)."""
    from concurrent.futures import ThreadPoolExecutor

    done = [0]

    def one(key: str) -> dict:
        kept = work / f"{key.replace(':', '-')}.json" if work is not None else None
        if kept is not None and kept.is_file():
            return json.loads(kept.read_text())
        if collect:
            return {"model": key, "result": "not run", "reason": "not run yet (zoo.py without --collect runs it)"}
        row = run_isolated(key, timeout, with_tp)
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            tmp = kept.with_suffix(".tmp")
            tmp.write_text(json.dumps(row))
            tmp.replace(kept)
        done[0] += 1
        print(f"[{done[0]}/{len(models)}] {key}: {row['result']} ({row.get('seconds')} s)"
              + (f", Torch-Pruning {row['torch_pruning']['result']}" if "torch_pruning" in row else ""),
              file=sys.stderr, flush=True)
        return row

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, models))


README = HERE.parents[1] / "docs" / "results.md"   # the page holding the zoo summary
START, END = "<!-- zoo-summary:start -->", "<!-- zoo-summary:end -->"


def _kind(reason: str) -> str:
    """A refusal's kind, from the first reason it gives."""
    text = reason.lower()
    kinds = (("layernorm", "LayerNorm (transformers, ConvNeXt)"), ("reshape", "reshape/view that moves channels"),
             ("did not converge", "grouping did not converge"), ("could not trace", "Torch-Pruning cannot trace it"),
             ("groupnorm", "GroupNorm"), ("fixed in the model", "fixed-size split"),
             ("ties them", "depthwise conv across a concatenation"))
    for key, kind in kinds:
        if key in text:
            return kind
    return "other: " + _short(reason)[:80]


def summary(res: dict, stem: str, link: str | None = None) -> str:
    """The results page's block: counts, the refusals by kind, Torch-Pruning alone, and where the table is
    (``link``: the table's path relative to the page; default from the repository root)."""
    rows = res["rows"]
    n, exact = len(rows), [r for r in rows if r["result"] == "exact"]
    whole = sum(1 for r in exact if not r.get("skipped"))
    kinds: dict[str, int] = {}
    for r in rows:
        if r["result"] == "refused":
            lines = [ln for ln in r["reason"].splitlines()[1:] if ln.startswith("  - ")] or [r["reason"]]
            kinds[_kind(lines[0])] = kinds.get(_kind(lines[0]), 0) + 1
    other = [r["model"] for r in rows if r["result"] not in ("exact", "refused", "not run")]
    not_run = sum(1 for r in rows if r["result"] == "not run")
    tp = {}
    for r in rows:
        key = r.get("torch_pruning", {}).get("result", "not run")
        tp[key] = tp.get(key, 0) + 1
    refused = sum(kinds.values())
    lines = [f"Last run ({res['date']}, {res['machine']}, `{res['command']}`): of {n} models, **{len(exact)} "
             f"exact** ({whole} with every channel group gated, {len(exact) - whole} with some groups left ungated "
             f"by name), {refused} refused by name"
             + (f", {len(other)} without a result ({', '.join(other)})" if other else "")
             + (f", {not_run} not run yet" if not_run else "") + ".",
             "", "| refused because | models |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines += ["", "Torch-Pruning alone on the same models: "
              + ", ".join(f"{v} {k}" for k, v in sorted(tp.items(), key=lambda kv: -kv[1])) + ".",
              f"Every model with its result, reason and time: [benchmarks/results/{stem}.md]"
              f"({link or f'benchmarks/results/{stem}.md'}) (JSON beside it)."]
    return "\n".join(lines)


def update_readme(path: Path, readme: Path = README) -> None:
    res = json.loads(path.read_text())
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    link = os.path.relpath(RESULTS / f"{path.stem}.md", readme.resolve().parent)
    readme.write_text(f"{head}{START}\n{summary(res, path.stem, link)}\n{END}{tail}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="tv:NAME / timm:NAME (a bare name is tv:)")
    parser.add_argument("--quick", action="store_true", help="only the models of tests/surgery/test_zoo.py")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per model (child process)")
    parser.add_argument("--no-tp", action="store_true", help="skip the Torch-Pruning-alone column")
    parser.add_argument("--jobs", type=int, default=1, help="models run at once (each on one thread)")
    parser.add_argument("--work", type=Path, default=Path("runs/zoo"),
                        help="each model's row is kept here as it ends and read back on the next run")
    parser.add_argument("--collect", action="store_true", help="write the table from the rows kept in --work only")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)   # child process: print one JSON row
    parser.add_argument("--tp-only", default=None, help=argparse.SUPPRESS)   # child: Torch-Pruning alone
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--readme", default=None, metavar="RESULT",
                        help="only rewrite the zoo summary of docs/results.md from this result (a stem under "
                             "benchmarks/results)")
    args = parser.parse_args(argv)
    if args.readme:
        update_readme(RESULTS / (args.readme if args.readme.endswith(".json") else args.readme + ".json"))
        return {}
    if args.one or args.tp_only:   # a child process of run_isolated: one thread, one JSON row
        import torch

        torch.set_num_threads(1)
        print(json.dumps(run_one(args.one, not args.no_tp) if args.one else run_tp(args.tp_only)))
        return {}
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    models = list(QUICK) if args.quick else [m if ":" in m else f"tv:{m}" for m in args.models or all_models()]
    rows = _run_all(models, args.timeout, not args.no_tp, args.jobs, args.work, args.collect)
    import torch

    res = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} CPU, 1 thread",
           "torch": torch.__version__, "command": _record.command("zoo.py", argv), "rows": rows}
    stem = "zoo-" + ("quick-" if args.quick else "") + f"cpu-{res['date']}"
    _record.write(args.out, stem, res, markdown(res))
    return res


if __name__ == "__main__":
    main()
