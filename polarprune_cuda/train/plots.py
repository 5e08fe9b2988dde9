"""The run's plots: gate probabilities over training, density against the target, accuracy per epoch; each
written atomically. matplotlib (the [train] extra) is imported when a plot is drawn."""
from __future__ import annotations

from pathlib import Path

import torch

from .._io import atomic_write


def plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = report["history"]
    files = []
    if hist["histogram"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        data = torch.tensor(hist["histogram"]).T
        data = data / data.sum(0, keepdim=True).clamp_min(1)
        im = ax.imshow(data.numpy(), aspect="auto", origin="lower", extent=(0.5, len(hist["epoch"]) + 0.5, 0, 1),
                       cmap="viridis")
        ax.set_xlabel("epoch")
        ax.set_ylabel("gate probability p")
        ax.set_title("Gate probabilities over training (polarization)")
        fig.colorbar(im, ax=ax, label="fraction of gates")
        files.append(_save(fig, out, "gates.png"))
    if hist["step"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(hist["step"], hist["step_density"], label="soft density (what the penalty sees)")
        if hist["density"]:
            ax.plot(hist["epoch_step"], hist["density"], "o-", ms=3, label="hard-gate density (end of epoch)")
        ax.axhline(1 - report["target_sparsity"], color="k", ls="--", label="target")
        ax.set_xlabel("step")
        ax.set_ylabel(f"density ({report['cost']})")
        ax.set_ylim(0, 1.05)
        ax.legend()
        files.append(_save(fig, out, "density.png"))
    if hist.get("macs_trace"):
        files.append(_macs_plot(report, out))
    files.append(_accuracy_plot(report, out, "gated model", extracted=True))
    return files


def _macs_plot(report: dict, out: Path) -> str:
    """macs.png: training MACs per step (a full batch, forward and backward) over the run, the dense
    network's beside it; the step where training moved to the extracted network marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .loop import TRAIN_MACS_FACTOR

    hist = report["history"]
    per_step = TRAIN_MACS_FACTOR * report["config"]["batch_size"]
    last = hist["epoch_step"][-1] if hist["epoch_step"] else hist["macs_trace"][-1][0] + 1
    xs, ys = [], []
    for i, (step, macs) in enumerate(hist["macs_trace"]):
        end = hist["macs_trace"][i + 1][0] if i + 1 < len(hist["macs_trace"]) else last
        xs += [step, end]
        ys += [macs * per_step, macs * per_step]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, ys, label="this run")
    ax.axhline(report["dense"]["macs"] * per_step, color="k", ls="--", label="dense network")
    for step in hist.get("switch_step") or []:
        ax.axvline(step, color="C3", ls=":", label="gates froze: the extracted network trains")
    ax.set_xlabel("step")
    ax.set_ylabel("training MACs per step")
    ax.set_ylim(0, None)
    ax.legend()
    return _save(fig, out, "macs.png")


def _accuracy_plot(report: dict, out: Path, label: str, extracted: bool) -> str:
    """accuracy.png: test accuracy per epoch, the dense baseline's beside it; returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = report["history"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(hist["epoch"], [100 * a for a in hist["test_accuracy"]], label=label)
    if report.get("baseline_curve"):
        ax.plot(range(1, len(report["baseline_curve"]) + 1), [100 * a for a in report["baseline_curve"]],
                label="dense baseline")
    if extracted:
        ax.axhline(100 * report["accuracy"]["pruned"], color="C2", ls="--", label="extracted model")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    return _save(fig, out, "accuracy.png")


def plot_names(method: str = "polar") -> list[str]:
    """The plots :func:`write` may draw for a run of ``method``."""
    return ["gates.png", "density.png", "macs.png", "accuracy.png"] if method == "polar" \
        else ["density.png", "accuracy.png"]


def _save(fig, out: Path, name: str) -> str:
    """Lay out ``fig``, write it to ``out/name`` atomically, close it; returns ``name``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(out / name, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return name


def sparse_plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..sparse.fggp import cubic_density

    hist, pr = report["history"], report["pruner"]
    files = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = list(range(0, pr["total_steps"] + 1, max(1, pr["total_steps"] // 200)))
    start = 1.0 if pr["start"] == "dense" else 0.5
    ax.plot(steps, [cubic_density(t, pr["end_step"], report["target_sparsity"], start) for t in steps],
            "--", color="gray", label="cubic schedule")
    ups = report["mask_updates"]
    ax.plot([u["step"] for u in ups], [u["density_target"] for u in ups], ".", ms=4, label="mask updates")
    if hist["epoch_step"]:
        ax.plot(hist["epoch_step"], hist["density"], "o-", ms=3, label="measured density (end of epoch)")
    ax.set_xlabel("step")
    ax.set_ylabel("density of weights")
    ax.set_ylim(0, 1.05)
    ax.legend()
    files.append(_save(fig, out, "density.png"))
    files.append(_accuracy_plot(report, out, report["method"], extracted=False))
    return files
