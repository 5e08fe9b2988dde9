"""The pruning recipe: :class:`PruneConfig`, its checks, and the names its options choose from.

Each field's ``metadata`` says how the command line shows it (cli.py builds the ``prune`` options from
the fields): ``help``, ``choices`` (from their single source) and ``flag`` (``None``: no generated option,
the CLI writes that one by hand).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..defaults import COST, COSTS, MIN_CHANNELS, PRETRAINED_FREEZE
from ..ops.common import is_number
from . import data as data_mod
from ..ops.reference import POLAR_FORMS, STE_MODES
from ..sparse import fggp as fggp_mod

#: polar: one-pass channel pruning with gates; the others: gradual unstructured pruning (fggp.py)
METHODS = ("polar", "fggp", "gmp", "annealed")
TARGET_CONTROLS = ("penalty", "dual")
#: what the target sparsity is a fraction of
#: autocast dtypes (None: float32)
AMP_MODES = ("bf16", "fp16")
#: where the initial gate scores come from (auto: the pretrained weights' ranks with --init, else constant)
SCORES_FROM = ("auto", "constant", "magnitude")
#: default warm-up and ramp of the penalty, as fractions of the run (docs/results.md, equal training budget)
WARMUP_FRACTION = 1 / 12
RAMP_FRACTION = 1 / 6
#: default freeze: a fraction of the run from scratch; with --init the gates freeze at once (no warm-up), on the
#: pretrained weights' ranking (benchmarks/results/pretrained-start-levers-fashion-12k.md)
FREEZE_FRACTION = 0.3
INIT_FREEZE_FRACTION = PRETRAINED_FREEZE


def _opt(default, help: str | None = None, choices=None, flag: str | None = ""):
    """A field with its command-line description (``flag`` "": the field's name as ``--kebab-case``)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if flag != "":
        meta["flag"] = flag
    return field(default=default, metadata=meta)


#: the largest learning rate, weight, decay, scale or epoch count a recipe takes: far above any useful value, far
#: below what overflows a float32 step (1e308 passed a finiteness check and then crashed the run)
NUMBER_MAX = 1e6
#: the largest initial gate score in magnitude (sigmoid(100) is 1 in float32 already)
SCORE_MAX = 100.0


@dataclass
class PruneConfig:
    """A one-pass pruning recipe (the CLI's options)."""

    model: str = _opt("resnet20", "resnet20/32/44/56/110 (CIFAR-style), resnet18/34/50 (torchvision) or "
                                  "module:function")
    dataset: str = _opt("digits", "data set: digits (bundled), fashion-mnist, cifar10, cifar100 (files under "
                                  "--data-dir), folder (your images)", choices=data_mod.DATASETS)
    method: str = _opt("polar", "polar: one-pass channel pruning with gates (a smaller, faster network); fggp, "
                                "gmp, annealed: gradual unstructured weight pruning (zeros, a smaller sparse copy)",
                       choices=METHODS)
    target_sparsity: float = _opt(0.5, "fraction of the cost to remove, in [0, 1) (unstructured methods: of the "
                                       "weights, in (0, 1))")
    cost: str = _opt(COST, "what the target sparsity is a fraction of (latency: measured on --device at "
                           "--latency-batch, tables cached in ~/.cache/polarprune_cuda; with --round-to, every "
                           "width the budget can choose is measured)", choices=COSTS)
    epochs: int = _opt(40, "training epochs, the whole one pass")
    batch_size: int = _opt(64, "the global batch (under torchrun: split over the processes)")
    lr: float = _opt(0.1, "weights' learning rate (cosine decay)")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-4, "weight decay of the weights (never of the gate scores)")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy")
    gate_lr: float = _opt(0.1, "gate scores' learning rate, times n_gates / target_weight")
    target_weight: float = _opt(20.0, "weight of the quadratic density term")
    polarization_weight: float = _opt(0.1, "weight of the polarization term")
    polarization: str = _opt("bimodal", "form of the polarization term", choices=POLAR_FORMS)
    # None: a fraction of the run (WARMUP_FRACTION, RAMP_FRACTION), so every run length gets the same recipe
    warmup_epochs: float | None = _opt(None, "epochs without the penalty at the start; unset: "
                                             f"{100 * WARMUP_FRACTION:.0f}% of --epochs, 0 with --init (unless "
                                             "--scores-from constant)")
    ramp_epochs: float | None = _opt(None, "epochs over which the penalty weight ramps to its full value; None "
                                           f"(unset): {100 * RAMP_FRACTION:.0f}% of --epochs")
    freeze_gates_at: float | None = _opt(None, "fraction of training after which the gates stop moving and the "
                                               f"weights settle; unset: {FREEZE_FRACTION:g}, {INIT_FREEZE_FRACTION:g} "
                                               "with --init (the pretrained weights' ranking decides at once; not with "
                                               "--scores-from constant)")
    # gate scores: initial value (p = sigmoid(score_init)), straight-through estimator
    score_init: float = _opt(1.0, "initial gate score (gate probability sigmoid(score-init))")
    scores_from: str = _opt("auto", "initial gate scores: constant (--score-init), magnitude (ranked in each group by "
                                    "the pretrained filters' L2 norms, from 0.25 to 2), auto: magnitude with --init",
                            choices=SCORES_FROM)
    ste: str = _opt("identity", "straight-through estimator of the hard gates' gradient", choices=STE_MODES)
    # how the density follows the target: "penalty" (fixed-weight quadratic term) or "dual" (its target
    # shifted by a multiplier updated by dual ascent every step, so the soft density tracks the target)
    target_control: str = _opt("penalty", "penalty: fixed-weight quadratic density term; dual: its target moved "
                                          "by dual ascent", choices=TARGET_CONTROLS)
    dual_lr: float = _opt(0.05, "step of the dual ascent")
    # the weights' learning rate after the gates freeze, as a multiple of the cosine schedule's
    freeze_lr_scale: float = _opt(1.0, "weights' learning rate after the gates freeze, times the cosine "
                                       "schedule's")
    keep_gated: bool = _opt(False, "train the gated network to the end instead of switching to the extracted "
                                   "(smaller, faster) network when the gates freeze; the result is the same up to "
                                   "float rounding")
    shrink_every: int | None = _opt(None, "before the gates freeze: at the end of an epoch, remove the channels "
                                          "whose gates were closed at the end of each of the last N epochs, so the "
                                          "network trains smaller from then on (the removed gates stay closed; the "
                                          "exact target still holds)")
    min_channels: int = _opt(MIN_CHANNELS, "fewest channels a gated group keeps")
    round_to: int | None = _opt(None, "round every group's kept channels to a multiple of this")
    finetune_epochs: int = _opt(0, "optional fine-tuning of the extracted model")
    seed: int = _opt(0, "seed of the weights, the data order and the augmentation")
    small_input: bool = _opt(False, "3x3 stride-1 stem for torchvision ResNets")
    init: str | None = _opt(None, "pretrained dense weights to start from: a state_dict in .pt, .pth or "
                                  ".safetensors; a classifier of another class count is re-initialised")
    reset_classifier: bool = _opt(False, "with --init: re-initialise the classifier whatever its shape")
    max_train: int | None = _opt(None, "use only the first N training images")
    max_test: int | None = _opt(None, "use only the first N test images")
    data_dir: str | None = _opt(None, "folder with the data set's files (nothing is downloaded)")
    image_size: int | None = _opt(None, "folder: the side of the square images the model sees (default: the "
                                        "first training image's larger side)")
    workers: int = _opt(0, "folder: processes decoding images (0: in the training process)")
    normalize: str | None = _opt(None, "folder: per-channel means then stds, comma-separated (default: computed "
                                       "from 512 training images)")
    # the CLI's --device (default auto) is written by hand
    device: str = _opt("cpu", flag=None)
    # block (layer) gates of method polar: one gate per residual branch, with or without channel gates
    # (the CLI's --blocks and --blocks-only set both)
    blocks: bool = _opt(False, flag=None)
    channel_gates: bool = _opt(True, flag=None)
    # precision and layout: autocast dtype (None, "bf16", "fp16"; fp16 adds a grad scaler), NHWC activations
    amp: str | None = _opt(None, "mixed precision: autocast to bf16 or fp16 (fp16 adds a grad scaler)",
                           choices=AMP_MODES)
    channels_last: bool = _opt(False, "NHWC memory format for weights and activations")
    latency_batch: int = _opt(32, "batch of the latency: measured in the report, and the tables of --cost latency")
    # under torchrun: BatchNorm statistics over the global batch (same result as one process)
    sync_bn: bool = _opt(False, "under torchrun: BatchNorm statistics over the global batch (the result of one "
                                "process)")
    # gradual unstructured methods (method fggp, gmp, annealed)
    update_every: int | None = _opt(None, "unstructured methods: steps between mask updates (default: 50 updates "
                                          "over 80% of the run)")
    select_ratio: float = _opt(0.5, "fggp: fraction of the remaining weights that are gradient candidates")
    start: str = _opt("dense", "unstructured methods: dense start, or a random ERK mask at 50% density",
                      choices=fggp_mod.STARTS)

    #: fields that may differ between a run and the checkpoint it resumes from
    RESUME_FREE = ("data_dir", "device", "workers")
    #: the most --latency-batch allocates as one example batch
    MAX_LATENCY_BATCH = 4096

    def validate(self) -> None:
        """ValueError naming the option (CLI spelling) whose value is out of its range; the checks run in this
        order, so the message names the first bad option."""
        self._check_method()
        self._check_choices()
        self._check_numbers()
        self._check_counts()

    def _positive_int(self, name: str) -> None:
        v = getattr(self, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name.replace('_', '-')} must be a positive int, got {v!r}")

    def _check_method(self) -> None:
        positive_int = self._positive_int
        for name in ("epochs", "batch_size", "min_channels"):
            positive_int(name)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "polar" and not 0 <= self.target_sparsity < 1:
            raise ValueError(f"target-sparsity must be in [0, 1), got {self.target_sparsity!r}")
        if self.method == "polar" and self.update_every is not None:
            raise ValueError(f"update-every applies to the unstructured methods ({', '.join(METHODS[1:])}), not to "
                             "method polar (its gates move every step)")
        if self.method != "polar":
            if not 0 < self.target_sparsity < 1:
                raise ValueError(f"target-sparsity must be in (0, 1) for method {self.method}, "
                                 f"got {self.target_sparsity!r}")
            if self.update_every is not None:
                positive_int("update_every")
            if self.start not in fggp_mod.STARTS:
                raise ValueError(f"start must be one of {', '.join(fggp_mod.STARTS)}, got {self.start!r}")
            if not 0 < self.select_ratio < 1:
                raise ValueError(f"select-ratio must be in (0, 1), got {self.select_ratio!r}")
            if self.finetune_epochs:
                raise ValueError(f"finetune-epochs applies to method polar only (method {self.method} keeps "
                                 "training the pruned weights to the end of the run)")
        if not self.channel_gates and not self.blocks:
            raise ValueError("blocks-only needs block gates: channel gates off and block gates off leave nothing "
                             "to prune")
        if self.blocks and self.method != "polar":
            raise ValueError(f"blocks applies to method polar only, got method {self.method}")
        self._check_shrink()

    def _check_shrink(self) -> None:
        if self.shrink_every is None:
            return
        self._positive_int("shrink_every")
        for bad, why in ((self.method != "polar", f"method polar only, got method {self.method}"),
                         (self.keep_gated, "a network that switches to its extraction (keep-gated keeps it whole)"),
                         (self.blocks, "channel gates without block gates (--blocks)"),
                         (self.round_to is not None, "round-to unset (rounding a width up may need a removed "
                                                     "channel)")):
            if bad:
                raise ValueError(f"shrink-every applies to {why}")

    def _check_choices(self) -> None:
        if self.amp is not None and self.amp not in AMP_MODES:
            raise ValueError(f"amp must be bf16 or fp16 (or left out for float32), got {self.amp!r}")
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {', '.join(COSTS)}, got {self.cost!r}")
        if self.dataset not in data_mod.DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(data_mod.DATASETS)}, got {self.dataset!r}")

    def _check_numbers(self) -> None:
        for name in ("lr", "gate_lr", "target_weight", "polarization_weight", "weight_decay", "momentum",
                     "warmup_epochs", "ramp_epochs", "label_smoothing"):
            v = getattr(self, name)
            if v is None and name in ("warmup_epochs", "ramp_epochs"):
                continue
            if not is_number(v) or v < 0 or v > NUMBER_MAX:
                raise ValueError(f"{name.replace('_', '-')} must be a number in [0, {NUMBER_MAX:g}], got {v!r}")
        if self.target_control not in TARGET_CONTROLS:
            raise ValueError(f"target-control must be one of {', '.join(TARGET_CONTROLS)}, got {self.target_control!r}")
        if self.ste not in STE_MODES:
            raise ValueError(f"ste must be identity, clipped or sigmoid, got {self.ste!r}")
        for name in ("score_init", "dual_lr", "freeze_lr_scale"):
            v = getattr(self, name)
            lo = -SCORE_MAX if name == "score_init" else 0
            hi = SCORE_MAX if name == "score_init" else NUMBER_MAX
            if not is_number(v) or not lo <= v <= hi:
                raise ValueError(f"{name.replace('_', '-')} must be a number in [{lo:g}, {hi:g}], got {v!r}")

    def _check_counts(self) -> None:
        for name in ("max_train", "max_test", "round_to", "image_size"):
            if getattr(self, name) is not None:
                self._positive_int(name)
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {self.workers!r}")
        if isinstance(self.latency_batch, bool) or not isinstance(self.latency_batch, int) \
                or not 1 <= self.latency_batch <= self.MAX_LATENCY_BATCH:
            raise ValueError(f"latency-batch must be a positive int (at most {self.MAX_LATENCY_BATCH}), got "
                             f"{self.latency_batch!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label-smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        for name in ("model", "init", "data_dir"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, str) and v):
                raise ValueError(f"{name.replace('_', '-')} must be a non-empty string, got {v!r}")
        if self.dataset == "digits" and self.data_dir is not None:
            raise ValueError(f"data-dir {self.data_dir!r} is not read by the digits data set (bundled with "
                             f"scikit-learn): drop --data-dir, or choose the data set that folder holds with "
                             f"--dataset ({', '.join(d for d in data_mod.DATASETS if d != 'digits')})")
        if self.dataset != "folder":
            for name, default in (("image_size", None), ("workers", 0), ("normalize", None)):
                if getattr(self, name) != default:
                    raise ValueError(f"{name.replace('_', '-')} is read by --dataset folder only, not by "
                                     f"{self.dataset}")
        elif self.data_dir is None:
            raise ValueError("dataset folder reads --data-dir DIR (DIR/train/<class>/<image>, "
                             "DIR/val/<class>/<image>)")
        if self.reset_classifier and not self.init:
            raise ValueError("reset-classifier re-initialises the classifier of --init's weights: give --init")
        if self.freeze_gates_at is not None and (not is_number(self.freeze_gates_at)
                                                 or not 0 < self.freeze_gates_at <= 1):
            raise ValueError(f"freeze-gates-at must be in (0, 1], got {self.freeze_gates_at!r}")
        if isinstance(self.finetune_epochs, bool) or not isinstance(self.finetune_epochs, int) \
                or self.finetune_epochs < 0:
            raise ValueError(f"finetune-epochs must be >= 0, got {self.finetune_epochs!r}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def initial_scores(self) -> str:
        """``constant`` or ``magnitude``: what --scores-from asks for, auto resolved (magnitude with --init)."""
        if self.scores_from != "auto":
            return self.scores_from
        return "magnitude" if self.init else "constant"

    def freeze_fraction(self) -> float:
        """The fraction of the run after which the gates freeze: the given value, or the default (from scratch,
        or with --init)."""
        if self.freeze_gates_at is not None:
            return float(self.freeze_gates_at)
        return INIT_FREEZE_FRACTION if self.ranked_start() else FREEZE_FRACTION

    def ranked_start(self) -> bool:
        """The scores start ranked by pretrained weights (--init with --scores-from auto or magnitude): the
        defaults are then no warm-up and an early freeze. With --scores-from constant they are the defaults
        from scratch, since constant scores rank nothing."""
        return bool(self.init) and self.initial_scores() == "magnitude"

    def ranked_freeze(self) -> bool:
        """True where the gates freeze at once by default (a ranked start, no freeze or warm-up given): the
        pretrained ranking decides, so scores that barely trained are what was asked for, not a warning."""
        return self.ranked_start() and self.freeze_gates_at is None and self.warmup_epochs is None

    def schedule_epochs(self, epochs: int | None = None) -> tuple[float, float]:
        """(warm-up, ramp) in epochs for a run of ``epochs`` (default ``self.epochs``): the given values, or the
        defaults where they are None (a fraction of the run; no warm-up with --init)."""
        epochs = self.epochs if epochs is None else epochs
        default_warmup = 0.0 if self.ranked_start() else WARMUP_FRACTION * epochs
        warmup = default_warmup if self.warmup_epochs is None else self.warmup_epochs
        ramp_ = RAMP_FRACTION * epochs if self.ramp_epochs is None else self.ramp_epochs
        return float(warmup), float(ramp_)
