"""Energy counters: NVML's total-energy counter on NVIDIA GPUs, RAPL on CPUs.

Only hardware counters are read; where none is readable the reason is
returned instead of a number (never an estimate). ``open_counter(device)``
picks the counter that matches where the work runs.

    counter, reason = open_counter(torch.device("cuda"))
    if counter is not None:
        watts = idle_power(counter)
        m = measure(step, counter, sync=torch.cuda.synchronize)
        m["joules"] / m["calls"]
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

POWERCAP = Path("/sys/class/powercap")


class EnergyCounter:
    """A monotonic energy reading in joules (``read()``), with the counter's range for wrap-around."""

    source: str = ""
    wrap_joules: float | None = None

    def read(self) -> float:
        raise NotImplementedError

    def delta(self, start: float, end: float) -> float:
        if end >= start:
            return end - start
        if self.wrap_joules is None:
            raise RuntimeError(f"energy counter {self.source} went backwards ({start} J -> {end} J)")
        return end + self.wrap_joules - start


class RaplCounter(EnergyCounter):
    """Sum of the package domains of Linux powercap/RAPL (``intel-rapl:N/energy_uj``; AMD exposes the same files)."""

    def __init__(self, root: Path = POWERCAP):
        self.files = sorted(p / "energy_uj" for p in Path(root).glob("intel-rapl:*") if p.name.count(":") == 1)
        if not self.files:
            raise FileNotFoundError(f"no RAPL package domain under {root} (intel-rapl:N missing)")
        ranges = []
        for f in self.files:
            int(f.read_text())          # raises PermissionError / OSError / ValueError if unreadable
            r = f.with_name("max_energy_range_uj")
            ranges.append(int(r.read_text()) if r.exists() else None)
        # several packages wrap independently; a wrap is handled per call of read() only for one package
        self.wrap_joules = ranges[0] / 1e6 if len(self.files) == 1 and ranges[0] else None
        self.source = "RAPL " + ", ".join(str(f.parent.name) for f in self.files)

    def read(self) -> float:
        return sum(int(f.read_text()) for f in self.files) / 1e6


class NvmlCounter(EnergyCounter):
    """NVML's ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the driver loaded; Volta and newer)."""

    def __init__(self, index: int = 0, uuid: str | None = None):
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self.handle = None
        if uuid is not None:     # CUDA and NVML may number the GPUs differently; the UUID is unambiguous
            try:
                self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            except pynvml.NVMLError:
                pass
        if self.handle is None:
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(self.handle)
        name = name.decode() if isinstance(name, bytes) else name
        self.read()                      # raises NVMLError_NotSupported on boards without the counter
        self.source = f"NVML total energy ({name})"

    def read(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3


def _cuda_uuid(device: torch.device) -> str | None:
    index = torch.cuda.current_device() if device.index is None else device.index
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is None:
        return None
    uuid = str(uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def open_counter(device) -> tuple[EnergyCounter | None, str]:
    """``(counter, source)`` for work on ``device``, or ``(None, reason)`` when no counter is readable."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            counter = NvmlCounter(device.index or 0, _cuda_uuid(device))
        except ImportError:
            return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py) so NVML cannot be read"
        except Exception as exc:     # pynvml.NVMLError and its NotSupported/NoPermission subclasses
            return None, f"NVML energy counter unreadable: {type(exc).__name__}: {exc}"
        return counter, counter.source
    try:
        counter = RaplCounter()
    except FileNotFoundError as exc:
        return None, f"no RAPL energy counter on this machine ({exc})"
    except PermissionError as exc:
        return None, f"RAPL energy counter is not readable by this user ({exc.filename})"
    except (OSError, ValueError) as exc:
        return None, f"RAPL energy counter unreadable: {exc}"
    return counter, counter.source


def measure(fn: Callable[[], object], counter: EnergyCounter, min_seconds: float = 2.0,
            sync: Callable[[], None] | None = None, min_calls: int = 1) -> dict:
    """Run ``fn`` repeatedly for at least ``min_seconds`` and ``min_calls``; joules, seconds and calls.

    The window must be long against the counter's update period (RAPL about
    1 ms, NVML tens of milliseconds), so the default is two seconds.
    """
    if not min_seconds > 0:
        raise ValueError(f"min_seconds must be > 0, got {min_seconds!r}")
    sync = sync or (lambda: None)
    sync()
    calls, e0, t0 = 0, counter.read(), time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < min_seconds:
        fn()
        calls += 1
        if calls % 8 == 0:
            sync()
    sync()
    seconds = time.perf_counter() - t0
    joules = counter.delta(e0, counter.read())
    return {"joules": joules, "seconds": seconds, "calls": calls, "watts": joules / seconds}


def idle_power(counter: EnergyCounter, seconds: float = 2.0) -> float:
    """Average watts over ``seconds`` of doing nothing (the floor that every measurement includes)."""
    e0, t0 = counter.read(), time.perf_counter()
    time.sleep(seconds)
    return counter.delta(e0, counter.read()) / (time.perf_counter() - t0)
