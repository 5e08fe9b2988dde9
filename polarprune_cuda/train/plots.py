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
    frozen = _frozen_from(report)
    if hist["histogram"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        shown, norm = gate_image(hist)
        im = ax.imshow(shown.numpy(), aspect="auto", origin="lower", extent=(0.5, len(hist["epoch"]) + 0.5, 0, 1),
                       cmap="viridis", norm=norm, interpolation="nearest")
        if frozen is not None and frozen <= len(hist["epoch"]):
            ax.axvline(frozen - 0.5, color="w", ls="--", lw=1)
            ax.text(frozen - 0.4, 0.95, "gates frozen: the same from here", color="w", fontsize=8, va="top")
        ax.set_xlabel("epoch (gates at its end)")
        ax.set_ylabel("gate probability p")
        ax.set_title("Gate probabilities over training (polarization)")
        fig.colorbar(im, ax=ax, label="fraction of gates (log)")
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
    files.append(_accuracy_plot(report, out, "gated model", extracted=True, frozen=frozen))
    return files


def gate_image(hist: dict):
    """The gates plot's image: per epoch (columns) the fraction of gates in each probability bin, empty bins NaN
    (drawn as background), and its colour scale: logarithmic, so the first epochs' spike (every gate at one
    probability) does not darken the later epochs."""
    from matplotlib.colors import LogNorm

    data = torch.tensor(hist["histogram"], dtype=torch.float64).T
    data = data / data.sum(0, keepdim=True).clamp_min(1)
    return data.masked_fill(data <= 0, float("nan")), LogNorm(vmin=1e-3, vmax=1.0)


def accuracy_segments(hist: dict, label: str, frozen: int | None) -> list[tuple[str, list, list]]:
    """(label, epochs, accuracy in %) of each part of the accuracy curve: before the epoch ``frozen`` the model
    ``label`` names; from it on the extracted network training (or the gated model with frozen gates, where the
    run kept it). The second part starts at the first's last point, so the curve stays joined."""
    epochs, acc = hist["epoch"], [100 * a for a in hist["test_accuracy"]]
    if frozen is None or frozen > len(epochs):
        return [(label, epochs, acc)]
    cut = frozen - 1
    after = "extracted network (training)" if hist.get("switch_step") else "gated model, gates frozen"
    parts = [(label, epochs[:cut], acc[:cut])] if cut else []
    return parts + [(after, epochs[max(cut - 1, 0):], acc[max(cut - 1, 0):])]


def _frozen_from(report: dict) -> int | None:
    """The first epoch (1-based) that ends after the gates froze, or None: from there on the gates no longer change
    and, unless the run kept the gated model, the extracted network is what trains."""
    from .config import PruneConfig

    hist = report["history"]
    if not hist["epoch_step"]:
        return None
    if hist.get("switch_step"):
        step = hist["switch_step"][0]
    else:
        names = PruneConfig.__dataclass_fields__
        cfg = PruneConfig(**{k: v for k, v in report["config"].items() if k in names})
        step = int(cfg.freeze_fraction() * hist["epoch_step"][-1] * cfg.epochs / len(hist["epoch_step"]))
    return next((i + 1 for i, end in enumerate(hist["epoch_step"]) if end > step), None)


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


def _accuracy_plot(report: dict, out: Path, label: str, extracted: bool, frozen: int | None = None) -> str:
    """accuracy.png: test accuracy per epoch, the dense baseline's beside it; returns the file name. From the
    epoch ``frozen`` on, the curve is labelled as the extracted network training (or the gated model with its gates
    frozen, where the run kept it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = report["history"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, (name, xs, ys) in enumerate(accuracy_segments(hist, label, frozen)):
        ax.plot(xs, ys, "o-", ms=3, label=name, zorder=3 - k)   # the gated part drawn over the joint
    if report.get("baseline_curve"):
        ax.plot(range(1, len(report["baseline_curve"]) + 1), [100 * a for a in report["baseline_curve"]],
                label="dense baseline")
    if extracted:
        ax.axhline(100 * report["accuracy"]["pruned"], color="C2", ls="--", label="extracted model, final")
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
