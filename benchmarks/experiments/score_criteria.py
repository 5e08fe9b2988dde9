"""From a pretrained model: which criterion should rank the gate scores? Runs ``pretrained_start.py`` with the
library's ranking (``polarprune_cuda.scores_from_magnitude``) replaced by another criterion, so every other part
of the one pass is the same. Results: benchmarks/results/pretrained-start-levers-fashion-12k.md.

Criteria (``--criterion``):

- ``taylor-global``: first-order Taylor importance of each channel (the loss change of closing it, from the
  gradient of the loss with respect to its gate: ``sum_b (gamma dL/dgamma + beta dL/dbeta)^2`` over the group's
  BatchNorms, 16 batches of 128 training images), one rank over every channel of the network, so the fill of
  the exact budget takes the least important channels wherever they are;
- ``taylor-group``: the same importance, ranked within each group (the allocation stays the budget's fill);
- ``tp-group``: Torch-Pruning's ``GroupMagnitudeImportance(p=2)`` on an ungated copy of the same weights,
  ranked within each group (a check: the library's ranking is the same order, tests/surgery/test_budget.py).

Every other argument goes to pretrained_start.py, e.g.
``python benchmarks/experiments/score_criteria.py --criterion taylor-group --data-dir DIR --seeds 0 1 2
--targets 0.5 0.7 --finetune-epochs 2 --lr 0.05 --arms one-pass --set warmup_epochs=0 freeze_gates_at=0.01
--tag taylor-group-f001-lr005``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CRITERIA = ("taylor-global", "taylor-group", "tp-group")
TAYLOR_BATCHES, BATCH = 16, 128
_seen: dict = {}


@torch.no_grad()
def _spread(bank, group, values: torch.Tensor) -> None:
    seg = bank.segment_scores(bank.names.index(group.name))
    seg.copy_(values.to(seg))


def _rank_scores(ranks: torch.Tensor, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * ranks / max(n - 1, 1)


def _taylor(model, data) -> list[torch.Tensor]:
    """Per group, per gate: sum over batches of (dL/dgate)^2, dL/dgate read from the group's BatchNorms."""
    from polarprune_cuda.surgery.attach import surgery_of

    _, record = surgery_of(model)
    modules = dict(model.named_modules())
    was = model.training
    model.eval()
    imp = [torch.zeros(g.size, dtype=torch.float64) for g in record.groups]
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))
    for b in order[:TAYLOR_BATCHES * BATCH].split(BATCH):
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            F.cross_entropy(model(data.train_x[b]), data.train_y[b]).backward()
        for k, g in enumerate(record.groups):
            c = torch.zeros(g.size, dtype=torch.float64)
            for name in g.gated:
                m = modules[name]
                if isinstance(m, torch.nn.BatchNorm2d) and m.weight.grad is not None and m.num_features == g.channels:
                    t = (m.weight * m.weight.grad + m.bias * m.bias.grad).double()
                    c += t.view(g.repeat, g.size).sum(0)
            imp[k] += c.pow(2)
    model.zero_grad(set_to_none=True)
    model.train(was)
    return imp


def _tp_group(model, data) -> list[torch.Tensor]:
    import torch_pruning as tp
    from polarprune_cuda.models import resnet20
    from polarprune_cuda.surgery.attach import surgery_of

    _, record = surgery_of(model)
    dense = resnet20(num_classes=int(data.train_y.max()) + 1, in_channels=data.train_x.shape[1])
    missing, _ = dense.load_state_dict({k: v for k, v in model.state_dict().items() if "polarprune_bank" not in k},
                                       strict=False)
    if missing:
        raise SystemExit(f"--criterion tp-group builds resnet20 only; missing {missing[:3]}")
    graph = tp.DependencyGraph().build_dependency(dense.eval(), example_inputs=data.train_x[:1])
    imp = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    modules = dict(dense.named_modules())
    return [imp(graph.get_pruning_group(modules[g.root], tp.prune_conv_out_channels,
                                        idxs=list(range(g.channels)))).double().view(g.repeat, g.size).sum(0)
            for g in record.groups]


def scores_by(criterion: str):
    def rank(model, low: float = 0.25, high: float = 2.0) -> None:
        from polarprune_cuda.surgery.attach import surgery_of

        bank, record = surgery_of(model)
        data = _seen["data"]
        imp = _taylor(model, data) if criterion.startswith("taylor") else _tp_group(model, data)
        if criterion == "taylor-global":
            flat = torch.cat(imp)
            scores = _rank_scores(flat.argsort(stable=True).argsort().double(), flat.numel(), low, high)
            for g, part in zip(record.groups, scores.split([g.size for g in record.groups])):
                _spread(bank, g, part)
        else:
            for g, v in zip(record.groups, imp):
                _spread(bank, g, _rank_scores(v.argsort(stable=True).argsort().double(), g.size, low, high))
    return rank


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--criterion", choices=CRITERIA, required=True)
    args, rest = p.parse_known_args(argv)
    from polarprune_cuda.train import runs

    load = runs.load_data

    def load_and_keep(cfg):
        _seen["data"] = load(cfg)
        return _seen["data"]

    import pretrained_start

    ranking = runs.scores_from_magnitude
    runs.load_data, runs.scores_from_magnitude = load_and_keep, scores_by(args.criterion)
    try:
        return pretrained_start.main(rest)
    finally:   # the library's own functions back (the smoke test runs in the suite's process)
        runs.load_data, runs.scores_from_magnitude = load, ranking
        _seen.clear()


if __name__ == "__main__":
    main()
