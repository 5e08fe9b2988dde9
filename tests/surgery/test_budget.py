"""The exact budget (budget.py): every run ends at the target sparsity, whatever its length.

All assertions are exact by construction (counts of the extracted network,
chosen gate sets), never closeness after training.
"""
import math
import warnings

import pytest
import torch

import polarprune_cuda as pp
from polarprune_cuda.surgery import budget
from polarprune_cuda import train
from polarprune_cuda.surgery.budget import TOLERANCE, meet_target, select_gates
from polarprune_cuda.surgery import count, kept_channels

TARGETS = (0.0, 0.3, 0.5, 0.7, 0.9)
COSTS = ("channels", "params", "macs")
X = torch.randn(2, 1, 8, 8)


def gated_resnet(seed=0, **kw):
    torch.manual_seed(seed)
    m = pp.resnet20(num_classes=10, in_channels=1)
    pp.attach_gates(m, X, **({"min_channels": 1} | kw))
    with torch.no_grad():
        pp.find_bank(m).scores.copy_(torch.randn(pp.find_bank(m).scores.shape, generator=torch.Generator().manual_seed(seed)))
    return m


def achieved(model, cost):
    """Sparsity of the extracted network, counted on it (channels: kept over gated, blocks remove theirs)."""
    small = pp.extract(model, X)
    if cost == "channels":
        bank = pp.find_bank(model)
        cm = bank.cost_model("channels")
        keep = bank.effective(torch.cat(kept_channels(model, warn=False)).float())
        return 1 - float(cm.cost(keep)) / cm.total, small
    dense = pp.find_bank(model).surgery.dense
    return 1 - count(small, X)[cost] / dense[cost], small


@pytest.mark.parametrize("blocks", [False, True], ids=["channel-gates", "channel-and-block-gates"])
@pytest.mark.parametrize("cost", COSTS)
def test_meet_target_hits_every_target_on_random_scores(cost, blocks):
    for target in TARGETS + (0.95,):
        m = gated_resnet(blocks=blocks)
        result = meet_target(m, target, cost)
        got, _ = achieved(m, cost)
        assert abs(got - target) <= TOLERANCE, (target, got)
        assert result.reason is None and result.within_tolerance
        assert got == pytest.approx(result.achieved_sparsity, abs=1e-9)   # what it reports is what extract gives
        if target == 0:
            assert bool((pp.find_bank(m).scores > 0).all())   # target 0 removes nothing


def test_meet_target_follows_the_scores_and_is_deterministic():
    m = gated_resnet()
    s0 = pp.find_bank(m).scores.detach().clone()
    chosen, r1 = select_gates(m, 0.5, "macs")
    chosen2, r2 = select_gates(m, 0.5, "macs")
    assert torch.equal(chosen, chosen2) and r1 == r2
    meet_target(m, 0.5, "macs")
    s1 = pp.find_bank(m).scores.detach()
    assert torch.equal((s1 > 0).double(), chosen)
    assert torch.equal(s1.abs().clamp(min=1e-3), s0.abs().clamp(min=1e-3))   # only signs change
    # every gate kept outranks most gates removed: the cut follows the score order (the fill may skip a
    # few expensive ones, so compare medians)
    assert float(s0[chosen > 0].median()) > float(s0[chosen == 0].median())


def test_predicted_count_equals_the_extracted_count_after_meet_target():
    m = gated_resnet()
    meet_target(m, 0.6, "params")
    small = pp.extract(m, X)
    assert pp.predicted_count(m) == {k: count(small, X)[k] for k in ("params", "macs")}


def test_min_channels_floor_is_the_nearest_achievable_and_says_why():
    m = gated_resnet(min_channels=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the guard is met by the choice, so kept_channels adds nothing
        result = meet_target(m, 0.95, "channels")
        got, _ = achieved(m, "channels")
    record = pp.find_bank(m).surgery
    floor = sum(min(g.size, math.ceil(min(8, g.channels) / g.repeat)) for g in record.groups)
    total = sum(g.size for g in record.groups)
    assert got == pytest.approx(1 - floor / total, abs=1e-12)
    assert not result.within_tolerance and "min_channels=8" in result.reason
    assert f"{100 * (1 - floor / total):.2f}%" in result.reason


def test_round_to_keeps_widths_in_steps_and_lands_within_one_step():
    m = gated_resnet(round_to=8)
    result = meet_target(m, 0.5, "channels")
    record = pp.find_bank(m).surgery
    masks = kept_channels(m, warn=False)
    for g, mask in zip(record.groups, masks):
        kept = int(mask.sum())
        assert kept % 8 == 0 or kept == g.size, (g.name, kept)
    got, _ = achieved(m, "channels")
    assert got == pytest.approx(result.achieved_sparsity, abs=1e-12)
    total = sum(g.size for g in record.groups)
    # within the tolerance, or else the reason names round_to and the gap is under one step of 8 channels
    assert result.within_tolerance or ("round_to=8" in result.reason and abs(got - 0.5) <= 8 / total)


@pytest.mark.parametrize("cost", ["params", "macs"])
def test_block_only_gates_reach_the_nearest_subset_and_say_so(cost):
    """Nine block gates: within the tolerance, or else the nearest of all 512 subsets (enumerated here)."""
    import itertools

    for target in (0.3, 0.5, 0.7):
        m = gated_resnet(channels=False, blocks=True)
        result = meet_target(m, target, cost)
        got, _ = achieved(m, cost)
        assert got == pytest.approx(result.achieved_sparsity, abs=1e-12)
        bank = pp.find_bank(m)
        cm = bank.cost_model(cost)
        n = bank.scores.numel()
        gaps = []
        for bits in itertools.product([0.0, 1.0], repeat=n):
            gaps.append(abs(float(cm.cost(bank.effective(torch.tensor(bits)))) - (1 - target) * cm.total))
        if result.within_tolerance:   # the score order landed close enough: kept
            assert result.reason is None
        else:                         # otherwise no subset is nearer, and the report says why
            assert abs(result.achieved_cost - result.budget) == pytest.approx(min(gaps), abs=1e-6 * cm.total)
            assert "block gates remove whole blocks only" in result.reason
            assert min(gaps) > TOLERANCE * cm.total


@pytest.mark.parametrize("bad, match", [(1.0, "target_sparsity"), (-0.1, "target_sparsity"),
                                        ("0.5", "target_sparsity"), (float("nan"), "target_sparsity")])
def test_bad_target_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        meet_target(gated_resnet(), bad, "macs")


def test_bad_cost_and_ungated_model_are_named():
    with pytest.raises(ValueError, match="cost must be one of"):
        meet_target(gated_resnet(), 0.5, "flops")
    with pytest.raises(ValueError, match="attach_gates"):
        meet_target(pp.resnet20(num_classes=10, in_channels=1), 0.5, "macs")


def test_user_loop_gets_the_same_guarantee():
    """A hand-written loop: penalty for a few steps, meet_target once, then the weights train the final net."""
    m = gated_resnet()
    opt = train.make_optimizer(m, lr=0.05)
    loss_fn = pp.PolarizationLoss(0.7, cost="params")
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        loss = torch.nn.functional.cross_entropy(m(x), y) + loss_fn(m)
        opt.zero_grad()
        loss.backward()
        opt.step()
    result = meet_target(m, 0.7, "params")
    hard = (pp.find_bank(m).scores > 0).clone()
    opt.param_groups[1]["lr"] = 0.0   # the gates freeze; the weights go on
    for _ in range(2):
        x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(pp.find_bank(m).scores > 0, hard)
    got, _ = achieved(m, "params")
    assert abs(got - 0.7) <= TOLERANCE and got == pytest.approx(result.achieved_sparsity, abs=1e-9)


# ----------------------------------------------------------------------------- whole runs

def tiny_config(**kw):
    base = dict(model="resnet20", dataset="digits", epochs=2, batch_size=32, max_train=64, max_test=32,
                min_channels=1, seed=0)
    return train.PruneConfig(**(base | kw))


def run_achieved(result, cost):
    if cost == "channels":
        kept, total = result.channels
        return 1 - kept / total
    return 1 - result.pruned_count[cost] / result.dense_count[cost]


@pytest.mark.parametrize("blocks", [False, True], ids=["channel-gates", "channel-and-block-gates"])
@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("target", TARGETS)
def test_two_epoch_run_ends_at_the_target(tmp_path, target, cost, blocks):
    cfg = tiny_config(target_sparsity=target, cost=cost, blocks=blocks)
    result = train.run_prune(cfg, tmp_path, progress=False)
    got = run_achieved(result, cost)
    assert abs(got - target) <= TOLERANCE, (target, cost, got)
    assert result.history.budget["reason"] is None
    if target == 0:
        assert result.pruned_count == result.dense_count


def test_gates_that_train_to_the_end_still_meet_the_target(tmp_path):
    cfg = tiny_config(target_sparsity=0.4, cost="macs", epochs=1, freeze_gates_at=1.0)
    result = train.run_prune(cfg, tmp_path, progress=False)
    assert abs(run_achieved(result, "macs") - 0.4) <= TOLERANCE


def test_the_run_reports_an_unreachable_target(tmp_path):
    cfg = tiny_config(target_sparsity=0.95, cost="channels", min_channels=8)
    result = train.run_prune(cfg, tmp_path, progress=False)
    assert "min_channels=8" in result.history.budget["reason"]
    assert result.history.budget["achieved_sparsity"] == pytest.approx(run_achieved(result, "channels"), abs=1e-12)
    assert budget.TOLERANCE == 0.005


def test_dual_control_resumes_bit_identically(tmp_path):
    """The dual multiplier lives in the checkpoint: interrupted + --resume equals uninterrupted (same layout)."""
    cfg = tiny_config(epochs=3, target_control="dual", warmup_epochs=0.5, ramp_epochs=0.5, freeze_gates_at=0.9)
    full = train.run_prune(cfg, tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train.run_prune(cfg, tmp_path / "cut", progress=False, interrupt_after=1)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert state["dual_shift"] != 0.0   # the multiplier moved during the first epoch
    resumed = train.run_prune(cfg, tmp_path / "cut", progress=False, resume=True)
    a, b = full.gated_model.state_dict(), resumed.gated_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.history.budget == resumed.history.budget


@pytest.mark.parametrize("field, value, match", [
    ("target_control", "pid", "target-control must be one of penalty, dual"),
    ("ste", "hard", "ste must be identity, clipped or sigmoid"),
    ("score_init", float("nan"), "score-init must be a number in"),
    ("dual_lr", -1.0, r"dual-lr must be a number in \[0, 1e\+06\]"),
    ("freeze_lr_scale", -0.5, r"freeze-lr-scale must be a number in \[0, 1e\+06\]"),
])
def test_recipe_lever_errors_name_the_option(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**{field: value}).validate()


def test_freeze_lr_scale_scales_the_weights_after_the_freeze_only():
    weights, gates = train.lr_lambdas(100, 40, 10, freeze_lr_scale=0.25)
    plain, _ = train.lr_lambdas(100, 40, 10)
    assert weights(39) == plain(39) and weights(40) == 0.25 * plain(40) and weights(99) == 0.25 * plain(99)
    assert gates(9) == 0 and gates(10) == 1 and gates(39) == 1 and gates(40) == 0


def test_default_schedule_is_a_fraction_of_the_run():
    assert train.PruneConfig(epochs=12).schedule_epochs() == (1.0, 2.0)
    assert train.PruneConfig(epochs=6).schedule_epochs() == (0.5, 1.0)
    assert train.PruneConfig(epochs=6, warmup_epochs=2.0, ramp_epochs=0.0).schedule_epochs() == (2.0, 0.0)
    with pytest.raises(ValueError, match=r"warmup-epochs must be a number in \[0, 1e\+06\]"):
        train.PruneConfig(warmup_epochs=-1.0).validate()


def test_scores_from_magnitude_rank_each_group_by_its_filters_and_keep_the_outputs():
    from polarprune_cuda.train.config import PruneConfig

    torch.manual_seed(0)
    model = pp.resnet20(num_classes=10, in_channels=1).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(torch.arange(1, 17, dtype=torch.float32).view(16, 1, 1, 1) ** 2)
    pp.attach_gates(model, x, min_channels=2)
    before = model(x)
    pp.scores_from_magnitude(model)
    bank = pp.find_bank(model)
    seg = bank.segment_scores(bank.names.index("layer1.0.conv1"))
    assert torch.equal(seg.argsort(), torch.arange(16))                   # the filters' order, by norm
    assert seg.min().item() == 0.25 and seg.max().item() == 2.0
    assert bool((bank.scores > 0).all())
    torch.testing.assert_close(model(x), before)                          # every gate still open
    with pytest.raises(ValueError, match="0 < low < high"):
        pp.scores_from_magnitude(model, low=0.0)
    # the CLI: magnitude scores where it starts from --init, constant ones otherwise, unless asked
    assert PruneConfig(init="w.pt").initial_scores() == "magnitude"
    assert PruneConfig().initial_scores() == "constant"
    assert PruneConfig(init="w.pt", scores_from="constant").initial_scores() == "constant"
    # and with --init the gates freeze at once (no warm-up) unless a freeze or a warm-up is given
    init = PruneConfig(init="w.pt", epochs=6)
    assert init.freeze_fraction() == 0.01 and init.schedule_epochs()[0] == 0.0 and init.ranked_freeze()
    scratch = PruneConfig(epochs=6)
    assert scratch.freeze_fraction() == 0.3 and scratch.schedule_epochs()[0] == 0.5 and not scratch.ranked_freeze()
    given = PruneConfig(init="w.pt", epochs=6, freeze_gates_at=0.3)
    assert given.freeze_fraction() == 0.3 and not given.ranked_freeze()
    assert not PruneConfig(init="w.pt", warmup_epochs=1.0).ranked_freeze()
    # constant scores rank nothing: with --init they get the defaults from scratch, not a freeze at once on ties
    constant = PruneConfig(init="w.pt", epochs=6, scores_from="constant")
    assert constant.freeze_fraction() == 0.3 and constant.schedule_epochs()[0] == 0.5 and not constant.ranked_freeze()
    with pytest.raises(ValueError, match="freeze-gates-at"):
        PruneConfig(freeze_gates_at=True).validate()


def test_scores_from_magnitude_rank_as_torch_pruning_group_l2():
    """Within every group, the scores' order is Torch-Pruning's GroupMagnitudeImportance(p=2) order on the same
    weights: producers, BatchNorms and the consumers' input columns (classifier included) all count."""
    import copy

    import torch_pruning as tp

    torch.manual_seed(0)
    dense = pp.resnet20(num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        for m in dense.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.2, 2.0)
    x = torch.randn(2, 1, 8, 8)
    model = copy.deepcopy(dense)
    pp.attach_gates(model, x, min_channels=2)
    pp.scores_from_magnitude(model)
    bank = pp.find_bank(model)
    graph = tp.DependencyGraph().build_dependency(dense, example_inputs=x)
    imp = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    modules = dict(dense.named_modules())
    checked = 0
    for name in bank.names:
        root = modules[name]
        group = graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs=list(range(root.out_channels)))
        want = imp(group).double().argsort(stable=True)
        got = bank.segment_scores(bank.names.index(name)).detach().argsort(stable=True)
        assert torch.equal(got, want), name
        checked += 1
    assert checked == 12            # every group of ResNet-20 (residual groups with their shortcuts included)


def test_channel_energy_of_a_grouped_consumer_counts_only_the_filters_that_read_each_input():
    from polarprune_cuda.surgery.attach import _channel_energy

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 4, 3, groups=2)          # inputs 0-2 feed outputs 0-1, inputs 3-5 outputs 2-3
    energy = _channel_energy(conv, "in")
    w = conv.weight.detach().double()
    for i in range(6):
        g, k = divmod(i, 3)
        assert energy[i].item() == pytest.approx(w[2 * g:2 * g + 2, k].pow(2).sum().item(), rel=1e-12)
    assert torch.allclose(_channel_energy(conv, "out"), w.pow(2).sum((1, 2, 3)))
