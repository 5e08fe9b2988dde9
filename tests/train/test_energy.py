"""Energy counters: RAPL files, NVML through a stand-in module, measurement windows, and the report's use."""
import sys
import types

import pytest
import torch
from torch import nn

from polarprune_cuda.train import energy, report


def _rapl_tree(root, packages):
    for i, (uj, max_uj) in enumerate(packages):
        d = root / f"intel-rapl:{i}"
        d.mkdir()
        (d / "energy_uj").write_text(f"{uj}\n")
        (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
        sub = root / f"intel-rapl:{i}:0"          # a sub-domain (core): inside the package, must not be added
        sub.mkdir()
        (sub / "energy_uj").write_text("999999999\n")
    return root


def test_rapl_sums_packages_only(tmp_path):
    root = _rapl_tree(tmp_path, [(1_000_000, 10**9), (2_500_000, 10**9)])
    c = energy.RaplCounter(root)
    assert c.read() == pytest.approx(3.5)
    assert "intel-rapl:0" in c.source and "intel-rapl:1" in c.source and "intel-rapl:0:0" not in c.source
    assert c.wrap_joules is None        # two packages wrap independently: a wrap is refused, not guessed


def test_rapl_wraps_once_on_one_package(tmp_path):
    root = _rapl_tree(tmp_path, [(9_000_000, 10_000_000)])
    c = energy.RaplCounter(root)
    assert c.delta(9.0, 1.0) == pytest.approx(2.0)    # 9 J -> wrap at 10 J -> 1 J
    assert c.delta(1.0, 3.0) == pytest.approx(2.0)


def test_rapl_missing_and_unreadable(tmp_path):
    with pytest.raises(FileNotFoundError, match="no RAPL package domain"):
        energy.RaplCounter(tmp_path)
    (tmp_path / "intel-rapl:0").mkdir()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("not a number")
    with pytest.raises(ValueError):
        energy.RaplCounter(tmp_path)


def test_counter_going_backwards_without_range_raises():
    c = energy.EnergyCounter()
    c.source = "test"
    with pytest.raises(RuntimeError, match="went backwards"):
        c.delta(5.0, 4.0)


class _FakeCounter(energy.EnergyCounter):
    """1 J per read: a deterministic counter."""
    source = "fake"

    def __init__(self):
        self.value = 0.0

    def read(self):
        self.value += 1.0
        return self.value


def test_measure_counts_calls_and_window():
    calls = []
    got = energy.measure(lambda: calls.append(1), _FakeCounter(), min_seconds=0.01, min_calls=5)
    assert got["calls"] == len(calls) >= 5
    assert got["joules"] == 1.0 and got["seconds"] >= 0.01
    with pytest.raises(ValueError, match="min_seconds"):
        energy.measure(lambda: None, _FakeCounter(), min_seconds=0)


def test_idle_power_is_counter_over_time():
    assert 0 < energy.idle_power(_FakeCounter(), seconds=0.05) <= 1.0 / 0.05


def _fake_pynvml(monkeypatch, *, supported=True):
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    mod.NVMLError = NVMLError
    mod.nvmlInit = lambda: None
    mod.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    mod.nvmlDeviceGetHandleByUUID = lambda u: (_ for _ in ()).throw(NVMLError("unknown uuid"))
    mod.nvmlDeviceGetName = lambda h: b"Fake GPU"
    state = {"mj": 1000}

    def total(h):
        if not supported:
            raise NVMLError("Not Supported")
        state["mj"] += 250
        return state["mj"]

    mod.nvmlDeviceGetTotalEnergyConsumption = total
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    return mod


def test_nvml_counter_reads_millijoules(monkeypatch):
    _fake_pynvml(monkeypatch)
    c = energy.NvmlCounter(0, uuid="GPU-unknown")      # the UUID lookup fails: falls back to the index
    a = c.read()
    assert c.read() - a == pytest.approx(0.25)
    assert "Fake GPU" in c.source


def test_open_counter_cuda_says_why_not(monkeypatch):
    _fake_pynvml(monkeypatch, supported=False)
    monkeypatch.setattr(energy, "_cuda_uuid", lambda device: None)
    counter, reason = energy.open_counter("cuda")
    assert counter is None and "NVML energy counter unreadable" in reason and "Not Supported" in reason
    monkeypatch.setitem(sys.modules, "pynvml", None)          # not installed
    counter, reason = energy.open_counter("cuda")
    assert counter is None and "nvidia-ml-py" in reason


def test_open_counter_cpu_here():
    counter, text = energy.open_counter("cpu")
    assert text
    if counter is not None:
        assert counter.read() >= 0


def test_report_energy_uses_the_counter(monkeypatch):
    monkeypatch.setattr(energy, "open_counter", lambda device: (_FakeCounter(), "fake counter"))
    models = {"dense": nn.Linear(4, 2), "pruned": nn.Linear(4, 1)}
    out = report.energy_side_by_side(models, torch.randn(3, 4), seconds=0.01)
    assert out["available"] and out["source"] == "fake counter"
    for name in models:
        assert out[name]["batches"] >= 1 and out[name]["joules_per_batch"] == pytest.approx(1.0 / out[name]["batches"])
    monkeypatch.setattr(energy, "open_counter", lambda device: (None, "no counter here"))
    assert report.energy_side_by_side(models, torch.randn(3, 4)) == {"available": False, "reason": "no counter here"}
