"""Prune a torchvision model in your own training loop: DataLoader, AdamW, cosine schedule, one pass.

    python examples/user_loop.py                  # ResNet-18 on scikit-learn's digits, 50% of the MACs removed
    python examples/user_loop.py --epochs 1 --max-steps 4   # the smoke run CI does

The loop is ordinary PyTorch; polarprune_cuda adds three calls: OnePass(...) once, pruner.penalty() in the loss,
pruner.step() after the optimizer's step. At 30% of the run the gates freeze, the target is met exactly, and the
rest of the run trains the extracted (smaller) network, its cosine schedule started again over the steps left;
finish() hands it back.
"""
import argparse

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import polarprune_cuda as pp


def digits(train: bool):
    """scikit-learn's 8x8 digits as 3x32x32 images (what an ImageNet-style stem expects), 80/20 split."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear").expand(-1, 3, -1, -1).contiguous()
    cut = int(0.8 * len(y))
    part = slice(0, cut) if train else slice(cut, None)
    return TensorDataset((x[part] - 0.5) / 0.5, torch.tensor(y[part]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (a smoke run)")
    parser.add_argument("--target", type=float, default=0.5, help="fraction of the MACs to remove")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train = DataLoader(digits(True), batch_size=64, shuffle=True, drop_last=True)
    test = DataLoader(digits(False), batch_size=256)
    steps = args.epochs * len(train) if args.max_steps is None else min(args.max_steps, args.epochs * len(train))

    model = torchvision.models.resnet18(num_classes=10)
    example = torch.randn(1, 3, 32, 32)
    pp.attach_gates(model, example)                          # learned binary gates on every prunable channel
    weights, scores = pp.split_parameters(model)             # the gate scores get a group of their own
    opt = torch.optim.AdamW([{"params": weights},
                             {"params": scores, "lr": pp.OnePass.gate_lr(torch.optim.AdamW, int(0.22 * steps),
                                                                         scores[0].numel()),
                              "weight_decay": 0.0}], lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    pruner = pp.OnePass(model, example, args.target, steps, opt, sched, cost="macs")

    step = 0
    while step < steps:
        for x, y in train:
            loss = F.cross_entropy(pruner.model(x), y) + pruner.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            pruner.step()
            step += 1
            if step == steps:
                break
    small = pruner.finish().eval()

    accuracy = pp.evaluate(small, test)                      # top-1 over the DataLoader
    dense, pruned = pp.count(model, example), pp.count(small, example)
    print(f"accuracy {accuracy:.3f}; MACs {pruned['macs'] / 1e6:.1f}M of {dense['macs'] / 1e6:.1f}M "
          f"({1 - pruned['macs'] / dense['macs']:.1%} removed, target {args.target:.0%}); params "
          f"{pruned['params'] / 1e6:.2f}M of {dense['params'] / 1e6:.2f}M; trained {steps} steps, the last "
          f"{steps - pruner.freeze_step} on the extracted network")
    return small, pruner


if __name__ == "__main__":
    main()
