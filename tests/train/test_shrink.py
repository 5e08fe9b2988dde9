"""--shrink-every: channels whose gates stayed closed are removed while the other gates still train
(surgery/shrink.py), the removed gates pinned closed, the exact target kept, resume across a shrink exact."""
import pytest
import torch

import polarprune_cuda as pp
from polarprune_cuda.surgery import shrink
from polarprune_cuda.surgery.budget import meet_target
from polarprune_cuda.surgery.spec import spec_digest
from polarprune_cuda import train

from helpers import gated_resnet20, without_clock

# 64 images, batches of 16: 4 steps an epoch, 16 in all; the gates freeze at step 9 (0.6 of 16), so the ends of
# epochs 1 and 2 (steps 4 and 8) may shrink
TINY = dict(dataset="digits", model="resnet20", max_train=64, max_test=48, batch_size=16, epochs=4,
            warmup_epochs=0.0, ramp_epochs=1.0, freeze_gates_at=0.6, min_channels=2, seed=5, shrink_every=1,
            target_sparsity=0.6)


def _gated(seed=0):
    return gated_resnet20(seed, batch=4)


def _closed_choice(model, share=0.5):
    """Half of each group's closed gates beyond its two guard channels."""
    bank = pp.find_bank(model)
    chosen = torch.zeros(bank.scores.numel(), dtype=torch.bool)
    for offset, size in zip(bank.offsets, bank.sizes):
        s = bank.scores.detach()[offset:offset + size]
        closed = torch.nonzero(s <= 0).flatten()
        room = min(int(closed.numel() * share), size - 2)
        chosen[offset + closed[:max(room, 0)]] = True
    return chosen


def test_removed_channels_leave_the_function_and_the_extraction_unchanged():
    model, x = _gated()
    chosen = _closed_choice(model)
    assert int(chosen.sum()) > 20
    small, maps = shrink.remove_gates(model, chosen)
    assert torch.equal(shrink.removed_gates(small), chosen)
    assert not bool(shrink.removed_gates(model).any())          # the original is not changed
    bank = pp.find_bank(small)
    assert bool((bank.scores.detach()[chosen] <= -shrink.PINNED_SCORE).all())
    before = {k: v for k, v in model.state_dict().items()}
    for name, t in small.state_dict().items():
        if name in maps:
            assert torch.equal(before[name].reshape(-1)[maps[name].reshape(-1)].view(t.shape), t), name
    assert pp.count(small, x)["macs"] < pp.count(model, x)["macs"]
    model.eval(), small.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-10, atol=1e-10)
    # the pinned gates get no gradient; the others do (eval mode: the BatchNorm statistics stay as they are)
    small(x).square().sum().backward()
    grad = bank.scores.grad
    assert bool((grad[chosen] == 0).all()) and bool((grad[~chosen] != 0).any())
    # the extraction is the one of the unshrunk model with the same gates (spec in the dense numbering)
    with torch.no_grad():
        pp.find_bank(model).scores.copy_(bank.scores.detach())
    a, b = pp.extract(model, x), pp.extract(small, x)
    assert spec_digest(a.polarprune_spec) == spec_digest(b.polarprune_spec)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-10, atol=1e-10)


def test_shrinking_twice_equals_shrinking_once():
    model, _ = _gated(seed=1)
    chosen = _closed_choice(model)
    first = chosen.clone()
    first[torch.nonzero(chosen).flatten()[::2]] = False
    step1, _ = shrink.remove_gates(model, first)
    step2, _ = shrink.remove_gates(step1, chosen)
    once, _ = shrink.remove_gates(model, chosen)
    assert {k: v.shape for k, v in step2.state_dict().items()} == {k: v.shape for k, v in once.state_dict().items()}
    assert torch.equal(shrink.removed_gates(step2), shrink.removed_gates(once))


def test_the_budget_never_opens_a_removed_gate():
    model, x = _gated(seed=2)
    chosen = _closed_choice(model, share=1.0)
    small, _ = shrink.remove_gates(model, chosen)
    result = meet_target(small, 0.05, "macs")   # asks for nearly everything back
    assert result.reason is None or "reach" in result.reason or result.achieved_sparsity > 0.05
    assert bool((pp.find_bank(small).scores.detach()[chosen] <= 0).all())
    assert pp.extract(small, x) is not None


def test_run_with_shrinking_meets_the_target_and_resumes_exactly(tmp_path):
    cfg = train.PruneConfig(**TINY)
    full = train.run_prune(cfg, tmp_path / "full", progress=False)
    h = full.history
    assert h.shrinks and h.shrinks[0][0] == 4 and all(n > 0 for _, n in h.shrinks)
    steps = [s for s, _ in h.macs_trace]
    macs = [m for _, m in h.macs_trace]
    assert steps == sorted(steps) and macs == sorted(macs, reverse=True) and len(macs) >= 3   # shrinks, switch
    assert h.budget["reason"] is None
    assert abs(h.budget["achieved_sparsity"] - TINY["target_sparsity"]) <= 0.005            # the exact target
    achieved = 1 - full.pruned_count["macs"] / full.dense_count["macs"]
    assert achieved == pytest.approx(h.budget["achieved_sparsity"], abs=1e-9)
    with pytest.raises(KeyboardInterrupt):
        train.run_prune(cfg, tmp_path / "cut", progress=False, interrupt_after=1)
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert bool(ckpt["shrink"]["removed"].any())                      # written after the first shrink
    resumed = train.run_prune(cfg, tmp_path / "cut", progress=False, resume=True)
    assert without_clock(full.history) == without_clock(resumed.history)
    # the extracted network bit for bit; of the gated model, the gates and every element the training reached
    # (a removed channel's weights stay where they were, multiplied by its closed gate)
    for k, v in full.pruned_model.state_dict().items():
        assert torch.equal(v, resumed.pruned_model.state_dict()[k]), k
    assert torch.equal(pp.find_bank(full.gated_model).scores, pp.find_bank(resumed.gated_model).scores)
    assert full.pruned_accuracy == resumed.pruned_accuracy == full.gated_accuracy


@pytest.mark.parametrize("extra, named", [
    ({"shrink_every": 0}, "shrink-every must be a positive int"),
    ({"keep_gated": True}, "keep-gated keeps it whole"),
    ({"blocks": True}, "without block gates"),
    ({"round_to": 4}, "round-to unset"),
    ({"method": "fggp"}, "method polar only"),
])
def test_shrink_options_are_checked(extra, named):
    with pytest.raises(ValueError, match=named):
        train.PruneConfig(**(TINY | extra)).validate()
