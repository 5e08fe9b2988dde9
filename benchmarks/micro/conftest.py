"""Options and fixtures of the benchmark suites (run with ``-c benchmarks/micro/pytest.ini``; see run.py)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from polarprune_cuda.train import energy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_addoption(parser):
    group = parser.getgroup("polarprune benchmarks")
    group.addoption("--tiny", action="store_true", help="tiny shapes and few rounds (the CI smoke run)")
    group.addoption("--energy-seconds", type=float, default=3.0,
                    help="length of each energy window in seconds (default 3; 0 turns energy off)")
    group.addoption("--rounds", type=int, default=None, help="timed rounds per benchmark (default per suite)")


@pytest.fixture(scope="session")
def device():
    return torch.device(DEVICE)


@pytest.fixture(scope="session")
def l2_flush(device):
    """The untimed set-up of a GPU round: a read-only pass over more bytes than the L2 cache holds."""
    return common.L2Flush(device)


@pytest.fixture(scope="session")
def tiny(request):
    return request.config.getoption("--tiny")


@pytest.fixture(scope="session")
def model_settings(device, tiny):
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return common.settings(device, tiny)


@pytest.fixture(scope="session")
def rounds(request, tiny):
    """``rounds(default)``: the timed rounds for a benchmark, fewer with --tiny, or --rounds."""
    forced = request.config.getoption("--rounds")
    return lambda default: forced or (2 if tiny else default)


class EnergyProbe:
    """Energy per call of a function from the device's hardware counter, with idle power, or why not."""

    def __init__(self, device, seconds: float, enabled: bool):
        self.device = device
        self.seconds = seconds
        self.counter, self.source = energy.open_counter(device) if enabled else (None, "energy turned off")
        self.idle_watts = None
        if self.counter is not None:
            self.idle_watts = energy.idle_power(self.counter, min(2.0, seconds))

    def info(self) -> dict:
        if self.counter is None:
            return {"available": False, "reason": self.source}
        return {"available": True, "source": self.source, "idle_watts": self.idle_watts,
                "window_seconds": self.seconds}

    def __call__(self, benchmark, fn, items: int) -> None:
        """Measure ``fn`` (which processes ``items`` samples per call) and put the result in extra_info."""
        if self.counter is None or benchmark.disabled:
            benchmark.extra_info["energy"] = {"available": False, "reason": self.source if self.counter is None
                                              else "benchmarks disabled"}
            return
        got = energy.measure(fn, self.counter, self.seconds, sync=lambda: common.sync(self.device), min_calls=3)
        above = got["joules"] - self.idle_watts * got["seconds"]
        benchmark.extra_info["energy"] = {
            "available": True, "source": self.source, "idle_watts": self.idle_watts, "watts": got["watts"],
            "seconds": got["seconds"], "calls": got["calls"],
            "joules_per_call": got["joules"] / got["calls"],
            "joules_per_item": got["joules"] / (got["calls"] * items),
            "joules_per_item_above_idle": above / (got["calls"] * items),
        }


@pytest.fixture(scope="session")
def energy_probe(request, device, tiny):
    seconds = request.config.getoption("--energy-seconds")
    disabled = request.config.getoption("benchmark_disable", False)
    return EnergyProbe(device, seconds, enabled=seconds > 0 and not tiny and not disabled)


def pytest_benchmark_update_machine_info(config, machine_info):
    """The device and the model settings go into the JSON of every run."""
    device = torch.device(DEVICE)
    tiny = config.getoption("--tiny")
    machine_info["polarprune"] = {
        "device": common.device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tiny": tiny,
        "settings": {k: v.to_dict() for k, v in common.settings(device, tiny).items()},
    }
