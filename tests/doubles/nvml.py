"""An NVML double: the agent's NVML seam (`controller.agent.nvml.Nvml`) over scripted GPUs.

Stands in where no GPU is present. It follows NVML's documented semantics,
with pynvml's constants and error texts: every call before `nvmlInit` (or
after the matching `nvmlShutdown`) fails with NVML_ERROR_UNINITIALIZED;
init is reference-counted; a bad index or clock type is
NVML_ERROR_INVALID_ARGUMENT; memory is in bytes with free = total - used,
power in milliwatts, clocks in MHz, temperature in °C, utilization in
percent; clocks event (throttle) reasons are `nvmlClocksEventReason*`
bitmasks; ECC queries are NVML_ERROR_NOT_SUPPORTED on a GPU without ECC;
a GPU that fell off the bus answers NVML_ERROR_GPU_IS_LOST to everything.
Tests change a `FakeGpu`'s fields between reads to script what NVML says.

In another process (the agent inside a running stack), `scenario_nvml` is
the agent's `FLEET_AGENT_NVML=tests.doubles.nvml:scenario_nvml` seam: it
builds the double from the JSON scenario file named by `FLEET_NVML_SCENARIO`
(written with `write_scenario`) and reads the file again whenever it changes,
so a test changes GPU facts (throttle reasons, which PIDs run where) while
the stack runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynvml

from controller.agent.nvml import Handle, MemoryInfo, NvmlError, ProcessInfo

GIB = 1024**3


def real_nvml_problem() -> str | None:
    """None when the real NVML initialises here (a GPU host), so tests use it; otherwise why not."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return str(exc)
    pynvml.nvmlShutdown()
    return None


def nvml_error(code: int) -> NvmlError:
    """The error the real binding raises for ``code``, with NVML's own text."""
    return NvmlError(code, str(pynvml.NVMLError(code)))


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA GeForce RTX 4090"
    utilization: int = 0  # percent
    memory_total: int = 24 * GIB  # bytes
    memory_used: int = 512 * 1024**2
    power_usage_mw: int = 21_000
    power_limit_mw: int = 450_000
    temperature_c: int = 34
    sm_clock_mhz: int = 210
    memory_clock_mhz: int = 405
    clocks_event_reasons: int = pynvml.nvmlClocksEventReasonGpuIdle
    supported_reasons: int = pynvml.nvmlClocksEventReasonAll
    ecc: tuple[int, int] | None = None  # volatile (corrected, uncorrected); None: the GPU has no ECC
    ecc_enabled: bool = True
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, used bytes or None)
    unsupported: set[str] = field(default_factory=set)  # seam method names answering NOT_SUPPORTED
    lost: bool = False


class FakeNvml:
    """Implements `controller.agent.nvml.Nvml`; its handles are the FakeGpu objects."""

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error  # e.g. NVML_ERROR_LIBRARY_NOT_FOUND, NVML_ERROR_DRIVER_NOT_LOADED
        self.refcount = 0
        self.stall: threading.Event | None = None  # a hung driver: device_count waits until this event is set
        self.calls = 0

    def init(self) -> None:
        if self.init_error is not None:
            raise nvml_error(self.init_error)
        self.refcount += 1

    def shutdown(self) -> None:
        self._ready()
        self.refcount -= 1

    def device_count(self) -> int:
        self._ready()
        if self.stall is not None:
            self.stall.wait()
        return len(self.gpus)

    def handle_by_index(self, index: int) -> Handle:
        self._ready()
        if not 0 <= index < len(self.gpus):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[index]
        if gpu.lost:
            raise nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        return gpu

    def uuid(self, handle: Handle) -> str:
        return self._gpu(handle, "uuid").uuid

    def name(self, handle: Handle) -> str:
        return self._gpu(handle, "name").name

    def utilization_gpu(self, handle: Handle) -> int:
        return self._gpu(handle, "utilization_gpu").utilization

    def memory_info(self, handle: Handle) -> MemoryInfo:
        gpu = self._gpu(handle, "memory_info")
        return MemoryInfo(total=gpu.memory_total, free=gpu.memory_total - gpu.memory_used, used=gpu.memory_used)

    def power_usage(self, handle: Handle) -> int:
        return self._gpu(handle, "power_usage").power_usage_mw

    def enforced_power_limit(self, handle: Handle) -> int:
        return self._gpu(handle, "enforced_power_limit").power_limit_mw

    def temperature(self, handle: Handle) -> int:
        return self._gpu(handle, "temperature").temperature_c

    def clock(self, handle: Handle, clock_type: int) -> int:
        gpu = self._gpu(handle, "clock")
        if clock_type in (pynvml.NVML_CLOCK_GRAPHICS, pynvml.NVML_CLOCK_SM):
            return gpu.sm_clock_mhz  # graphics and SM clocks run together on current GPUs
        if clock_type == pynvml.NVML_CLOCK_MEM:
            return gpu.memory_clock_mhz
        raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def current_clocks_event_reasons(self, handle: Handle) -> int:
        gpu = self._gpu(handle, "current_clocks_event_reasons")
        return gpu.clocks_event_reasons & gpu.supported_reasons

    def supported_clocks_event_reasons(self, handle: Handle) -> int:
        return self._gpu(handle, "supported_clocks_event_reasons").supported_reasons

    def ecc_mode(self, handle: Handle) -> tuple[int, int]:
        gpu = self._gpu(handle, "ecc_mode")
        if gpu.ecc is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mode = pynvml.NVML_FEATURE_ENABLED if gpu.ecc_enabled else pynvml.NVML_FEATURE_DISABLED
        return mode, mode

    def total_ecc_errors(self, handle: Handle, error_type: int, counter_type: int) -> int:
        gpu = self._gpu(handle, "total_ecc_errors")
        if gpu.ecc is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if counter_type not in (pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED:
            return gpu.ecc[0]
        if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED:
            return gpu.ecc[1]
        raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def compute_processes(self, handle: Handle) -> list[ProcessInfo]:
        gpu = self._gpu(handle, "compute_processes")
        return [ProcessInfo(pid, used) for pid, used in gpu.processes]

    def _ready(self) -> None:
        self.calls += 1
        if self.refcount <= 0:
            raise nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: Handle, call: str) -> FakeGpu:
        self._ready()
        if not isinstance(handle, FakeGpu) or not any(handle is gpu for gpu in self.gpus):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if handle.lost:
            raise nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        if call in handle.unsupported:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return handle


# -- a scenario file, for the agent of a running stack ---------------------------------

SCENARIO_ENV = "FLEET_NVML_SCENARIO"


def write_scenario(path: Path, gpus: list[FakeGpu]) -> None:
    """Write the GPUs as a scenario file, atomically: a reader sees the old file or the new one, never half."""
    rows = []
    for gpu in gpus:
        row = dataclasses.asdict(gpu)
        row["unsupported"] = sorted(gpu.unsupported)
        rows.append(row)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps({"gpus": rows}, indent=2), encoding="utf-8")
    os.replace(partial, path)


def read_scenario(path: Path) -> list[FakeGpu]:
    """The GPUs of a scenario file: ``{"gpus": [{FakeGpu field: value, ...}, ...]}``, in index order."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    gpus = []
    for row in doc["gpus"]:
        fields: dict[str, Any] = dict(row)
        if fields.get("ecc") is not None:
            fields["ecc"] = tuple(fields["ecc"])
        fields["processes"] = [(int(pid), used) for pid, used in fields.get("processes", [])]
        fields["unsupported"] = set(fields.get("unsupported", []))
        gpus.append(FakeGpu(**fields))
    return gpus


class ScenarioNvml(FakeNvml):
    """A FakeNvml whose GPUs come from a scenario file, read again when the file changes.

    The file is looked at when a round of reading begins (`init`, `device_count`), so one
    round sees one scenario. A file that cannot be read keeps the last good scenario.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(read_scenario(path))
        self.path = path
        self._stamp = self._stat()

    def init(self) -> None:
        self._reload()
        super().init()

    def device_count(self) -> int:
        self._reload()
        return super().device_count()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _reload(self) -> None:
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return
        try:
            self.gpus = read_scenario(self.path)
        except (OSError, ValueError, KeyError, TypeError):
            return  # try again on the next round
        self._stamp = stamp


def scenario_nvml() -> ScenarioNvml:
    """The agent's NVML seam (`FLEET_AGENT_NVML=tests.doubles.nvml:scenario_nvml`): GPUs from $FLEET_NVML_SCENARIO."""
    path = os.environ.get(SCENARIO_ENV)
    if not path:
        raise RuntimeError(f"{SCENARIO_ENV} is not set: it names the JSON scenario file of the NVML double")
    return ScenarioNvml(Path(path))
