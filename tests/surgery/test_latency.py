"""The latency cost: tables cached under their device, dtype and batch; the cost model exact where the device's
times are bilinear in the widths; the budget against a brute-force search; the penalty's gradient."""
import itertools
import json

import pytest
import torch
from torch import nn

import polarprune_cuda as pp
from polarprune_cuda import ops
from polarprune_cuda.surgery import latency as lat
from polarprune_cuda.surgery.costs import widths
from polarprune_cuda.surgery.budget import TOLERANCE


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


#: in the whole network a layer also takes this long per element of its input (what the calibration finds)
READ_MS = 1e-5


def synthetic_layer_ms(m: nn.Module) -> float:
    """A device whose layers take a bilinear time in their widths."""
    c_in, c_out = widths(m)
    if isinstance(m, nn.BatchNorm2d):
        return 0.05 + 0.004 * c_out
    if isinstance(m, nn.Linear):
        return 0.02 + 0.001 * c_in + 0.0005 * c_out + 0.0001 * c_in * c_out
    return 0.1 + 0.01 * c_in + 0.02 * c_out + 0.003 * c_in * c_out


def _reads(net: nn.Module, batch: int) -> int:
    """The input elements the layers of a Tiny network read (6x6 maps; the Linear reads the pooled features)."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    return batch * sum(widths(m)[1 if isinstance(m, nn.BatchNorm2d) else 0] * (1 if isinstance(m, nn.Linear) else 36)
                       for m in layers)


def synthetic_network_ms(net: nn.Module, batch: int = 2, layer_ms=synthetic_layer_ms) -> float:
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    return sum(layer_ms(m) for m in layers) + READ_MS * _reads(net, batch)


def _device(monkeypatch, layer_ms, calls=None):
    """Time layers and networks on a synthetic device (``calls`` records each timing)."""
    def log(what):
        if calls is not None:
            calls.append(what)

    monkeypatch.setattr(lat, "layer_ms", lambda layer, x: log(1) or layer_ms(layer))
    monkeypatch.setattr(lat, "network_ms", lambda net, inputs: log("network")
                        or synthetic_network_ms(net, len(inputs[0]), layer_ms))


@pytest.fixture
def synthetic(monkeypatch):
    _device(monkeypatch, synthetic_layer_ms)


def _gated(min_channels=1, batch=2, dtype=torch.float32):
    torch.manual_seed(0)
    model = Tiny().to(dtype)
    x = torch.randn(batch, 3, 6, 6, dtype=dtype)
    pp.attach_gates(model, x[:1], min_channels=min_channels)
    return model, x


def _set_counts(model, counts):
    bank = pp.find_bank(model)
    g = torch.zeros(bank.scores.numel())
    for start, size, k in zip(bank.offsets, bank.sizes, counts):
        g[start:start + k] = 1.0
    with torch.no_grad():
        bank.scores.copy_(g * 2 - 1)
    return g


def test_cost_model_is_the_devices_latency_for_every_width(synthetic):
    model, x = _gated()
    result = pp.latency_cost(model, x, cache=False)
    cm = pp.find_bank(model).cost_model("latency")
    assert result.scale == 1.0 and result.per_element == pytest.approx(READ_MS, rel=1e-6)
    assert cm.total == pytest.approx(synthetic_network_ms(Tiny()), rel=1e-6)
    sizes = pp.find_bank(model).sizes
    assert sizes == [8, 8]
    for counts in itertools.product(range(1, 9), repeat=2):
        g = _set_counts(model, counts)
        truth = synthetic_network_ms(pp.extract(model, x, verify=False))
        assert float(cm.cost(g)) == pytest.approx(truth, rel=1e-5), counts
        assert result.predict(model) == pytest.approx(truth, rel=1e-5)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_budget_meets_the_latency_target_against_a_brute_force_search(synthetic, target):
    model, x = _gated()
    pp.latency_cost(model, x, cache=False)
    total = pp.find_bank(model).cost_model("latency").total
    budget = (1 - target) * total
    truths = {}
    for counts in itertools.product(range(1, 9), repeat=2):
        _set_counts(model, counts)
        truths[counts] = synthetic_network_ms(pp.extract(model, x, verify=False))
    best = min(abs(t - budget) for t in truths.values())   # the nearest achievable latency, any widths
    pp.scores_from_magnitude(model)
    result = pp.meet_target(model, target, "latency")
    achieved = synthetic_network_ms(pp.extract(model, x, verify=False))
    assert result.achieved_cost == pytest.approx(achieved, rel=1e-5)
    # against the brute force: the score order cannot always reach the nearest of all widths, but it stops no
    # further from it than one gate's latency, and below the budget no closed gate still fits in it
    cm = pp.find_bank(model).cost_model("latency")
    chosen = (pp.find_bank(model).scores.detach() > 0).float()
    steps = []
    for j in torch.nonzero(chosen == 0).flatten().tolist():
        more = chosen.clone()
        more[j] = 1.0
        steps.append(float(cm.cost(more)) - achieved)
    assert abs(achieved - budget) <= max(best + max(steps, default=0.0), TOLERANCE * total)
    if achieved <= budget:
        assert all(achieved + step > budget * (1 + 1e-6) for step in steps)


def test_penalty_gradient_matches_finite_differences(synthetic):
    model, x = _gated()
    pp.latency_cost(model, x, cache=False)
    cm = pp.find_bank(model).cost_model("latency")
    s = (torch.randn(cm.linear.numel(), dtype=torch.float64) * 2).requires_grad_()
    fn = lambda s: ops.gate_penalty(s, cm, 0.8, 0.4, 1.5, 0.6, "bimodal", 1.0)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-4)
    pp.PolarizationLoss(0.5, cost="latency")(model).backward()   # the loss takes the bank's latency cost
    assert pp.find_bank(model).scores.grad.abs().sum() > 0


def _counting(monkeypatch):
    calls = []
    _device(monkeypatch, synthetic_layer_ms, calls)
    return calls


def test_tables_are_cached_under_device_dtype_and_batch(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    cache = tmp_path / "latency.json"
    model, x = _gated()
    first = pp.latency_cost(model, x, cache=cache)
    assert first.measured > 0 and calls and json.loads(cache.read_text())["format"] == lat.CACHE_FORMAT
    calls.clear()
    again = pp.latency_cost(model, x, cache=cache)
    assert again.measured == 0 and not calls and again.tables == first.tables   # nor the whole networks again
    assert again.calibration == first.calibration
    for other in ({"batch": 3}, {"dtype": torch.float64}):
        model, y = _gated(**other)
        assert pp.latency_cost(model, y, cache=cache).measured > 0 and calls, other
        calls.clear()
    monkeypatch.setattr(lat, "device_name", lambda device: "cuda:another GPU")   # another device
    model, _ = _gated()
    assert pp.latency_cost(model, x, cache=cache).measured > 0 and calls


def test_a_damaged_cache_is_measured_anew(tmp_path, monkeypatch):
    _counting(monkeypatch)
    cache = tmp_path / "latency.json"
    cache.write_text("{not json")
    model, x = _gated()
    with pytest.warns(UserWarning, match="unreadable"):
        assert pp.latency_cost(model, x, cache=cache).measured > 0
    assert json.loads(cache.read_text())["format"] == lat.CACHE_FORMAT


def test_latency_needs_gates_and_a_positive_bound():
    with pytest.raises(ValueError, match="attach_gates"):
        pp.latency_cost(Tiny(), torch.randn(1, 3, 6, 6), cache=False)
    model, x = _gated()
    with pytest.raises(ValueError, match="max_seconds must be a positive number"):
        pp.latency_cost(model, x, cache=False, max_seconds=0)
    with pytest.raises(ValueError, match="latency"):
        pp.meet_target(model, 0.5, "latency")   # not measured yet


def test_the_real_timer_builds_a_model_that_only_grows_with_width(tmp_path):
    """On this machine's clock (no synthetic device): every fitted coefficient but the constant is >= 0, so an
    open gate never lowers the predicted latency, and the dense prediction is the measured dense network."""
    model, x = _gated()
    result = pp.latency_cost(model, x, cache=tmp_path / "latency.json", max_seconds=5)
    assert all(v >= 0 for c in result.coefs.values() for v in c[1:])
    cm = pp.find_bank(model).cost_model("latency")
    assert float(cm.linear.min()) >= 0 and (cm.coef.numel() == 0 or float(cm.coef.min()) >= 0)
    assert result.calibration[1] == pytest.approx(result.dense_ms)


@pytest.mark.filterwarnings("ignore:the optimizer had no parameter group", "ignore:the gates freeze at step")
def test_onepass_with_cost_latency_measures_at_latency_inputs(synthetic):
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(3, 3, 6, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    recipe = pp.OnePass(model, x[:1], 0.5, 20, opt, cost="latency", latency_inputs=x, min_channels=1)
    assert recipe.latency.key["batch"] == 3 and "latency" in pp.find_bank(model).cost_kinds
    for _ in range(recipe.freeze_step + 1):
        loss = recipe.model(x).square().mean() + recipe.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        recipe.step()
    assert recipe.budget["cost"] == "latency" and abs(recipe.budget["achieved_sparsity"] - 0.5) <= 0.1
    truth = synthetic_network_ms(pp.extract(recipe.gated, x, verify=False), 3)
    assert truth == pytest.approx(recipe.budget["achieved_cost"], rel=1e-5)
    with pytest.raises(ValueError, match="cost must be one of channels, params, macs, latency"):
        pp.OnePass(Tiny(), x[:1], 0.5, 20, torch.optim.SGD(Tiny().parameters(), lr=0.01), cost="flops")


def test_a_table_reads_its_own_entries_and_is_bilinear_between_them():
    t = lat.Table([2, 4], [1, 3, 5], [[1.0, 2.0, 4.0], [3.0, 5.0, 9.0]])
    for ci, co, ms in t.points():
        assert t.at(ci, co) == ms
    assert t.at(3, 2) == pytest.approx((1.0 + 2.0 + 3.0 + 5.0) / 4)
    assert t.at(2, 4) == pytest.approx(3.0) and t.at(3, 5) == pytest.approx(6.5)
    assert t.at(1, 0) == 1.0 and t.at(9, 9) == 9.0   # the nearest entry beyond the table
    assert lat.Table([0], [2, 6], [[1.0, 5.0]]).at(123, 3) == pytest.approx(2.0)   # one width


def stepped_layer_ms(m: nn.Module) -> float:
    """A device whose convolutions run twice as long at a width off a multiple of 4 (as oneDNN's blocked kernels
    do on a CPU): no bilinear fit follows it; a table at every width the budget can choose does."""
    c_in, c_out = widths(m)
    off = c_out % 4 or (isinstance(m, nn.Conv2d) and c_in != 3 and c_in % 4)
    return synthetic_layer_ms(m) * (2.0 if off else 1.0)


def stepped_network_ms(net: nn.Module) -> float:
    return synthetic_network_ms(net, 2, stepped_layer_ms)


@pytest.fixture
def stepped(monkeypatch):
    _device(monkeypatch, stepped_layer_ms)


def _lattice_model():
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(2, 3, 6, 6)
    pp.attach_gates(model, x[:1], min_channels=1, round_to=2)
    return model, x


def test_with_round_to_the_budget_reads_each_width_it_can_choose_from_the_tables(stepped):
    model, x = _lattice_model()
    result = pp.latency_cost(model, x, cache=False)
    assert all(t.widths_out == [2, 4, 6, 8] for n, t in result.tables.items() if n != "fc")
    bank = pp.find_bank(model)
    fit_errors = []
    for counts in itertools.product(range(2, 9, 2), repeat=2):
        g = _set_counts(model, counts)
        truth = stepped_network_ms(pp.extract(model, x, verify=False))
        assert result.predict(model) == pytest.approx(truth, rel=1e-9), counts
        fit_errors.append(abs(float(bank.cost_model("latency").cost(g)) / truth - 1))
    assert max(fit_errors) > 0.2   # the fitted model (the penalty's) misses the steps; the budget does not use it
    for target in (0.3, 0.5, 0.7):
        pp.scores_from_magnitude(model)
        budget = pp.meet_target(model, target, "latency")
        truth = stepped_network_ms(pp.extract(model, x, verify=False))
        assert budget.achieved_cost == pytest.approx(truth, rel=1e-9)
        assert budget.total == pytest.approx(stepped_network_ms(Tiny()), rel=1e-9)


def test_a_table_for_another_lattice_is_not_reused(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    cache = tmp_path / "latency.json"
    model, x = _gated()
    pp.latency_cost(model, x, cache=cache)
    calls.clear()
    model, x = _lattice_model()
    assert pp.latency_cost(model, x, cache=cache).measured > 0 and calls


def test_the_time_beyond_the_layers_goes_to_their_reads_and_a_faster_network_is_scaled_down():
    assert lat.compose((10.0, 12.0), 100.0) == (1.0, pytest.approx(0.02))
    assert lat.compose((10.0, 8.0), 100.0) == (pytest.approx(0.8), 0.0)
