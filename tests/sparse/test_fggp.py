"""FGGP and its baselines against an independent, straightforward implementation of the authors' steps."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as tprune

import polarprune_cuda as pp
from polarprune_cuda.sparse import fggp


class Net(nn.Module):
    """Small seeded CNN with tanh (no exact-zero gradients, so no ties in the selections)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc1 = nn.Linear(8 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x):
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(F.avg_pool2d(self.conv2(x), 2))
        x = torch.tanh(self.conv3(x))
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


def _opt(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


# ----------------------------------------------------------------------------- the independent reference

def authors_density(t, end, target_ratio, initial_ratio=100.0):
    """The authors' schedule, in percent: target_ratio is 100 (1 - target sparsity), 10.0 for 90%."""
    return target_ratio * 0.01 + 0.01 * (initial_ratio - target_ratio) * (1 - t / end) ** 3


def target_ratio_of(target):
    return round(100 * (1 - target), 9)     # the percentage a user types: 10.0 for 0.9


class Reference:
    """The authors' structure: torch.nn.utils.prune masks (weight = weight_orig * mask in a forward pre-hook),
    and the update written out step by step with sorts.

    FGGP and annealed as main_proposed_class_schedule_cifar.py: the first conv is never pruned and every
    other layer carries a mask from the start. GMP as main.py: every layer is prunable (its --prune-conv1
    defaults to True) and the masks are put on at the first update, so that update ranks the live weights
    after the optimizer step."""

    def __init__(self, model, target, T, delta, how, rho=0.5, rate=(0.5, 0.0)):
        self.model, self.target, self.T, self.delta, self.how, self.rho, self.rate = model, target, T, delta, how, rho, rate
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.all_layers = layers
        self.main_py = how == "gmp"
        self.layers = layers if self.main_py else layers[1:]
        if not self.main_py:
            for m in self.layers:
                tprune.identity(m, "weight")
        self.N = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in layers)
        self.end = int(0.8 * T)

    def masks(self):
        return [m.weight_mask.bool().clone() for m in self.layers]

    def after_optimizer_step(self, t):
        if not (t % self.delta == 0 and t <= self.end):
            return
        d = authors_density(t, self.end, target_ratio_of(self.target))
        # m.weight: masked, from the last forward (main.py before its first update: the live parameter)
        Z = sum(int((m.weight == 0).sum()) for m in self.all_layers)
        k = int(np.floor(self.N * (1 - d) - Z))
        R = self.N - Z
        if self.main_py and not hasattr(self.layers[0], "weight_mask"):
            for m in self.layers:
                tprune.identity(m, "weight")   # weight = weight_orig * 1: the live weights after this step
        if k <= 0:
            return
        mask = torch.cat([m.weight_mask.flatten() for m in self.layers]).bool()
        grad = torch.cat([m.weight_orig.grad.flatten() for m in self.layers]).abs()
        mag = torch.cat([m.weight.detach().flatten() for m in self.layers]).abs()
        active = [i for i in range(mask.numel()) if mask[i]]
        if self.how == "fggp":
            cand = sorted(active, key=lambda i: float(grad[i]))[: math.floor(self.rho * R)]
            prune = sorted(cand, key=lambda i: float(mag[i]))[:k]
        elif self.how == "gmp":
            prune = sorted(active, key=lambda i: float(mag[i]))[:k]
        else:
            r0, r1 = self.rate
            rate = r1 + (r0 - r1) * (1 + math.cos(math.pi * min(t / self.end, 1))) / 2
            cand = sorted(active, key=lambda i: float(mag[i]))[: max(k, math.floor(rate * R))]
            prune = sorted(cand, key=lambda i: float(grad[i]))[:k]
        new = mask.clone()
        new[torch.tensor(prune, dtype=torch.long)] = False
        i = 0
        for m in self.layers:
            n = m.weight_mask.numel()
            m.weight_mask.copy_(new[i:i + n].view_as(m.weight_mask).float())
            i += n


def _train_both(how, target=0.9, T=60, delta=6, **kw):
    torch.manual_seed(0)
    ours_model = Net()
    ref_model = copy.deepcopy(ours_model)
    cls = {"fggp": pp.FGGP, "gmp": fggp.GMP, "annealed": fggp.AnnealedPruner}[how]
    pruner = cls(ours_model, target, T, update_every=delta, **kw)
    ref = Reference(ref_model, target, T, delta, how)
    o1, o2 = _opt(ours_model), _opt(ref_model)
    history = []
    for t, (x, y) in enumerate(_batches(T), start=1):
        for model, opt in ((ours_model, o1), (ref_model, o2)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        record = pruner.step()
        with torch.no_grad():
            ref.after_optimizer_step(t)
        if record is not None:
            history.append((t, record, [m.clone() for m in pruner.masks], ref.masks(), pruner.sparsity()))
    return pruner, ref, history, ours_model, ref_model


@pytest.mark.parametrize("how", ["fggp", "gmp", "annealed"])
def test_masks_equal_the_independent_implementation_after_every_update(how):
    pruner, ref, history, ours, theirs = _train_both(how)
    assert len(history) == 8                        # updates at 6, 12, ..., 48 = int(0.8 * 60)
    for t, record, ours_masks, ref_masks, _ in history:
        for a, b in zip(ours_masks, ref_masks):
            assert torch.equal(a, b), f"{how}: masks differ after the update at step {t}"
    # the effective weights of both trainings stay equal (the same trajectory for every active weight)
    for name in ("conv1", "conv2", "conv3", "fc1", "fc2") if how == "gmp" else ("conv2", "conv3", "fc1", "fc2"):
        theirs_w = getattr(theirs, name).weight_orig * getattr(theirs, name).weight_mask
        torch.testing.assert_close(getattr(ours, name).weight, theirs_w, rtol=0, atol=0)


def test_density_follows_the_cubic_schedule_and_hits_the_target_at_0_8_T():
    pruner, _, history, _, _ = _train_both("fggp", target=0.9, T=60, delta=6)
    N = pruner.N
    for t, record, _, _, sp in history:
        d = authors_density(t, 48, 10.0)
        assert record["density_target"] == d
        # after the update exactly floor(N (1 - d_t)) entries are zero
        assert N - sp["nonzeros"] == math.floor(N * (1 - d)), t
    t, record, _, _, sp = history[-1]
    assert t == 48 and sp["sparsity"] == math.floor(N * 0.9) / N
    assert abs(sp["sparsity"] - 0.9) < 1 / N
    # after the schedule: no more updates, sparsity unchanged
    assert pruner.update_due(54) is False and pruner.sparsity()["sparsity"] == sp["sparsity"]


def test_pruned_weights_stay_exactly_zero_through_momentum_and_weight_decay():
    torch.manual_seed(1)
    model = Net()
    pruner = pp.FGGP(model, 0.8, 40, update_every=4)
    opt = _opt(model)
    for x, y in _batches(40, seed=3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()
        for p, m in zip(pruner.params, pruner.masks):
            assert bool((p[~m] == 0).all())
    assert pruner.sparsity()["sparsity"] >= 0.8 - 1 / pruner.N
    state = pruner.export()
    for name, p, m in zip(pruner.names, pruner.params, pruner.masks):
        assert torch.equal(state[f"{name}.weight"] != 0, m & (p != 0))
    assert bool((model.conv1.weight != 0).all())     # the first conv is never pruned
    assert bool((model.fc1.bias != 0).all())         # biases are never pruned


def _run(steps, model, pruner, opt, batches):
    for x, y in batches[:steps]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()


@pytest.mark.parametrize("start", ["dense", "erk50"])
def test_resume_gives_identical_masks(start):
    batches = _batches(50, seed=5)
    torch.manual_seed(2)
    a = Net()
    b_model = copy.deepcopy(a)
    pa = pp.FGGP(a, 0.9, 50, update_every=5, start=start)
    oa = _opt(a)
    _run(50, a, pa, oa, batches)

    pb = pp.FGGP(b_model, 0.9, 50, update_every=5, start=start)
    ob = _opt(b_model)
    _run(23, b_model, pb, ob, batches)
    saved = copy.deepcopy({"model": b_model.state_dict(), "opt": ob.state_dict(), "pruner": pb.state_dict()})

    torch.manual_seed(99)
    c = Net()
    pc = pp.FGGP(c, 0.9, 50, update_every=5, start=start, seed=0)
    oc = _opt(c)
    c.load_state_dict(saved["model"])
    oc.load_state_dict(saved["opt"])
    pc.load_state_dict(saved["pruner"])
    _run(27, c, pc, oc, batches[23:])
    assert pc.steps_taken == pa.steps_taken == 50
    for x, y in zip(pa.masks, pc.masks):
        assert torch.equal(x, y)
    for (n, x), y in zip(a.state_dict().items(), c.state_dict().values()):
        assert torch.equal(x, y), n
    assert pc.updates == pa.updates


def test_state_dict_refuses_another_configuration():
    p1 = pp.FGGP(Net(), 0.9, 50, update_every=5)
    with pytest.raises(ValueError, match="written by fggp"):
        pp.FGGP(Net(), 0.8, 50, update_every=5).load_state_dict(p1.state_dict())
    with pytest.raises(ValueError, match="written by fggp"):
        fggp.GMP(Net(), 0.9, 50, update_every=5).load_state_dict(p1.state_dict())
    with pytest.raises(ValueError, match="not a pruner state_dict"):
        p1.load_state_dict({"t": 3})


def _erk_solved(shapes, density):
    """ERK densities solved directly: the dense layers are the smallest set D, taken in decreasing order of
    sum(shape) / prod(shape), for which eps = (density * W - |D|) / sum of sum(shape) outside D keeps every
    other layer's eps * sum(shape) / prod(shape) at or below 1 (W: all weights, |D|: the weights in D)."""
    W = sum(math.prod(s) for s in shapes.values())
    order = sorted(shapes, key=lambda n: -sum(shapes[n]) / math.prod(shapes[n]))
    for j in range(len(order) + 1):
        dense, rest = order[:j], order[j:]
        eps = (density * W - sum(math.prod(shapes[n]) for n in dense)) / sum(sum(shapes[n]) for n in rest)
        if all(eps * sum(shapes[n]) / math.prod(shapes[n]) <= 1 for n in rest):
            return {n: 1.0 if n in dense else eps * sum(shapes[n]) / math.prod(shapes[n]) for n in shapes}


class WideFirst(nn.Module):
    """A first conv that ERK does not keep dense (three equal convs; the small Linear stays dense)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.fc(torch.tanh(self.conv3(x)).mean((2, 3)))


@pytest.mark.parametrize("net", [Net, WideFirst])
def test_erk50_start_spends_the_budget_over_every_layer_with_seeded_bernoulli_masks(net):
    torch.manual_seed(0)
    model = net()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    shapes = {n: tuple(m.weight.shape) for n, m in layers}
    expected = _erk_solved(shapes, 0.5)
    got = fggp.erk_densities(shapes, 0.5)
    assert got.keys() == expected.keys()
    for n in shapes:
        assert got[n] == pytest.approx(expected[n], rel=1e-12, abs=1e-15), n
    # the budget: half of all Conv2d/Linear weights, the first conv included
    assert sum(expected[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx(0.5 * sum(
        math.prod(s) for s in shapes.values()))
    target = 0.9 if net is Net else 0.6      # WideFirst's first conv holds a third of its weights
    pruner = pp.FGGP(model, target, 50, update_every=5, start="erk50", seed=3)
    g = torch.Generator().manual_seed(3)
    draws = {n: torch.rand(m.weight.shape, generator=g) < expected[n] for n, m in layers}   # module order
    assert pruner.names == [n for n, _ in layers[1:]]
    for name, m in zip(pruner.names, pruner.masks):
        assert torch.equal(m, draws[name]), name
    (first_mask,) = pruner.fixed_masks
    assert torch.equal(first_mask, draws["conv1"])
    for p, m in zip(pruner.params + pruner.fixed_weights, pruner.masks + pruner.fixed_masks):
        assert bool((p[~m] == 0).all())
    assert pruner.density_at(0) == 0.5
    again = pp.FGGP(net(), target, 50, update_every=5, start="erk50", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(pruner.masks + pruner.fixed_masks, again.masks + again.fixed_masks))
    if net is WideFirst:
        assert expected["conv1"] < 1 and not bool(first_mask.all())    # the first conv is masked too
        # ... and keeps that mask, and no more, through training and mask updates
        opt = _opt(model)
        g = torch.Generator().manual_seed(4)
        for _ in range(40):
            opt.zero_grad()
            F.cross_entropy(model(torch.randn(8, 16, 6, 6, generator=g)), torch.randint(0, 5, (8,), generator=g)).backward()
            opt.step()
            pruner.step()
        assert torch.equal(model.conv1.weight != 0, first_mask)
        state = pruner.state_dict()
        pruner.fixed_masks = [torch.ones_like(first_mask)]
        pruner.load_state_dict(state)
        assert torch.equal(pruner.fixed_masks[0], first_mask)
    else:
        assert expected["fc2"] == 1.0 and expected["conv1"] == 1.0    # the two densest layers stay dense
    with pytest.raises(ValueError, match="starting sparsity"):
        pp.FGGP(net(), 0.4, 50, update_every=5, start="erk50")


def test_removals_follow_the_authors_percent_arithmetic_over_a_scan():
    """k = int(np.floor(N (1 - d_t) - Z)) with d_t computed in percent, over many (N, t) pairs."""
    differ = 0
    for target in (0.5, 0.7, 0.9, 0.95, 0.98):
        tr = target_ratio_of(target)
        for T, delta in ((150, 5), (100, 1), (1000, 10)):
            end = int(0.8 * T)
            for N in list(range(1000, 30000, 37)) + [21780]:
                for t in range(delta, end + 1, delta):
                    ours = math.floor(N * (1 - fggp.cubic_density(t, end, target)))
                    theirs = int(np.floor(N * (1 - authors_density(t, end, tr))))
                    assert ours == theirs, (target, N, t)
                    plain = math.floor(N * (1 - ((1 - target) + target * (1 - t / end) ** 3)))
                    differ += plain != theirs
    assert differ > 0       # the scan holds points where the fraction arithmetic removes one weight more
    # the boundary case measured on the authors' code: 13793.999999999996 there, 13794.0 in fraction arithmetic
    assert 21780 * (1 - fggp.cubic_density(40, 120, 0.9)) == 13793.999999999996
    assert fggp.cubic_density(120, 120, 0.9) == 10.0 * 0.01
    assert fggp.cubic_density(0, 120, 0.9, 0.5) == 10.0 * 0.01 + 0.01 * (50.0 - 10.0)


class Wide(nn.Module):
    """N = 21,780 Conv2d/Linear weights and biases: the first conv (40) and one Linear (21,740)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(21739, 1)

    def forward(self, x):
        return self.fc(x) + self.conv1(x[:, :9].view(-1, 1, 3, 3)).sum((1, 2, 3)).unsqueeze(1)


@pytest.mark.parametrize("how", ["fggp", "gmp"])
def test_the_boundary_update_removes_what_the_authors_code_removes(how):
    """The issue's case: N = 21,780, target 0.9, T = 150, an update every 5 steps: at t = 40 the authors'
    density gives N (1 - d) = 13793.999999999996, so 13,793 weights are zero after that update, not 13,794."""
    torch.manual_seed(0)
    model = Wide()
    cls = {"fggp": pp.FGGP, "gmp": fggp.GMP}[how]
    pruner = cls(model, 0.9, 150, update_every=5, prune_first_conv=True)
    assert pruner.N == 21780
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    for t in range(1, 41):
        opt.zero_grad()
        model(torch.randn(4, 21739, generator=g)).square().mean().backward()
        opt.step()
        record = pruner.step()
    assert record["step"] == 40 and record["Z"] + record["k"] == 13793
    assert pruner.N - pruner.sparsity()["nonzeros"] == 13793


def test_gmp_first_update_ranks_the_weights_after_the_optimizer_step():
    """main.py's GMP: no masks before the first update, so it ranks the live weights after optimizer.step();
    ranking the forward pass's weights there (FGGP's rule) gives other masks."""
    _, _, history, _, _ = _train_both("gmp")
    t, _, ours, theirs, _ = history[0]
    assert t == 6 and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    _, _, other, _, _ = _train_both("gmp", first_update_weights="forward")
    assert not all(torch.equal(a, b) for a, b in zip(other[0][2], theirs))
    assert all(torch.equal(a, b) for a, b in zip(other[0][3], theirs))      # the same reference run


@pytest.mark.parametrize("kwargs,match", [
    ({"target_sparsity": 1.0}, "target_sparsity must be a number in \\(0, 1\\)"),
    ({"target_sparsity": 0.0}, "target_sparsity must be a number in \\(0, 1\\)"),
    ({"target_sparsity": float("nan")}, "target_sparsity"),
    ({"update_every": 0}, "update_every must be a positive int"),
    ({"update_every": -3}, "update_every must be a positive int"),
    ({"update_every": 2.5}, "update_every must be a positive int"),
    ({"total_steps": 0}, "total_steps must be a positive int"),
    ({"total_steps": 10, "update_every": 9}, "before the first update"),
    ({"select_ratio": 1.5}, "select_ratio"),
    ({"start": "sparse"}, "start must be one of"),
    ({"target_sparsity": 0.99, "total_steps": 20, "update_every": 8}, "too coarse"),
    ({"first_update_weights": "later"}, "first_update_weights must be one of forward, stepped"),
])
def test_bad_configuration_is_refused(kwargs, match):
    args = {"target_sparsity": 0.9, "total_steps": 100, "update_every": 10} | kwargs
    with pytest.raises(ValueError, match=match):
        pp.FGGP(Net(), **args)


def test_prune_first_conv_must_be_a_bool():
    with pytest.raises(TypeError, match="prune_first_conv must be a bool, got 'yes'"):
        fggp.GMP(Net(), 0.9, 100, update_every=10, prune_first_conv="yes")
    gmp, ours = fggp.GMP(Net(), 0.9, 100, update_every=10), pp.FGGP(Net(), 0.9, 100, update_every=10)
    assert gmp.names[0] == "conv1" and ours.names[0] == "conv2" and ours.fixed_names == ["conv1"]


def test_schedule_not_aligned_with_updates_warns():
    with pytest.warns(UserWarning, match="not a multiple of update_every"):
        p = pp.FGGP(Net(), 0.9, 100, update_every=7)
    assert p.final_update_density() > 0.1


def test_step_without_gradients_says_what_to_do():
    model = Net()
    pruner = pp.FGGP(model, 0.5, 10, update_every=1)
    with pytest.raises(RuntimeError, match="no forward pass"):
        pruner.step()
    model(torch.randn(2, 1, 8, 8))
    pruner.steps_taken = 0
    with pytest.raises(RuntimeError, match="no gradient"):
        pruner.step()


def test_sparse_copy_round_trip_and_size(tmp_path):
    torch.manual_seed(0)
    model = Net()
    pruner = pp.FGGP(model, 0.9, 40, update_every=4)
    _run(40, model, pruner, _opt(model), _batches(40))
    state = pruner.export()
    sizes = fggp.save_sparse(state, tmp_path / "sparse.pt")
    back = fggp.load_sparse(tmp_path / "sparse.pt")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert sizes["sparse_bytes"] < 0.5 * sizes["dense_bytes"]
    packed = fggp.sparse_state_dict(state)["fc1.weight"]
    assert packed["bitmask"].numel() == math.ceil(state["fc1.weight"].numel() / 8)
    assert packed["values"].numel() == int((state["fc1.weight"] != 0).sum())
