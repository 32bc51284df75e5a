"""NVML behind a small seam: the calls the agent makes, the real ones over pynvml, and a bounded reader.

`Nvml` is the seam: one method per NVML call the agent needs, returning
what NVML returns in NVML's own units (bytes, milliwatts, MHz, °C, percent,
bitmasks) and raising `NvmlError` with NVML's return code. `Pynvml` is the
real thing over nvidia-ml-py; the tests swap in a double
(`tests/doubles/nvml.py`) where no GPU is present.

`NvmlReader` owns the NVML session and turns one round of calls into facts
in Prometheus base units (ratios, bytes, watts, hertz). What NVML does not
support on a GPU, or fails to answer, is left out (None), never invented;
when NVML itself is down the reading says why and carries no GPUs at all.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

# NVML return codes and enum values used here (nvml.h; stable across driver versions).
# The test suite checks them against pynvml's.
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_FEATURE_ENABLED = 1

# Clocks event (formerly "throttle") reason bits, nvmlClocksEventReason*.
REASON_GPU_IDLE = 0x1
REASON_SW_POWER_CAP = 0x4
REASON_HW_SLOWDOWN = 0x8
REASON_SW_THERMAL = 0x20
REASON_HW_THERMAL = 0x40
REASON_HW_POWER_BRAKE = 0x80

# The reasons the agent reports, and the NVML bits behind each.
THROTTLE_REASONS: dict[str, int] = {
    "thermal": REASON_SW_THERMAL | REASON_HW_THERMAL,
    "power_cap": REASON_SW_POWER_CAP,
    "hw_slowdown": REASON_HW_SLOWDOWN | REASON_HW_POWER_BRAKE,
}

# A hung driver call must not hang every scrape: past this the reading says NVML is down.
NVML_TIMEOUT_S = 5.0

Handle = object  # NVML's opaque device handle
T = TypeVar("T")


class NvmlError(Exception):
    """An NVML call failed; ``code`` is NVML's return code (None: no NVML library binding at all)."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def not_supported(self) -> bool:
        """This GPU or driver cannot answer this call: the fact is absent, not an error."""
        return self.code in (NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND)


@dataclass(frozen=True)
class MemoryInfo:
    total: int  # bytes
    free: int
    used: int


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    used_gpu_memory: int | None  # bytes; None where NVML cannot tell (e.g. Windows WDDM)


class Nvml(Protocol):
    """The NVML calls the agent makes, in NVML's units. Each may raise NvmlError."""

    def init(self) -> None: ...

    def shutdown(self) -> None: ...

    def device_count(self) -> int: ...

    def handle_by_index(self, index: int) -> Handle: ...

    def uuid(self, handle: Handle) -> str: ...

    def name(self, handle: Handle) -> str: ...

    def utilization_gpu(self, handle: Handle) -> int:
        """Percent of the last sample period in which a kernel ran (nvmlDeviceGetUtilizationRates().gpu)."""
        ...

    def memory_info(self, handle: Handle) -> MemoryInfo: ...

    def power_usage(self, handle: Handle) -> int:
        """Milliwatts drawn by the board."""
        ...

    def enforced_power_limit(self, handle: Handle) -> int:
        """Milliwatts: the power limit in force."""
        ...

    def temperature(self, handle: Handle) -> int:
        """°C of the GPU die (NVML_TEMPERATURE_GPU)."""
        ...

    def clock(self, handle: Handle, clock_type: int) -> int:
        """MHz, current clock of NVML_CLOCK_SM or NVML_CLOCK_MEM."""
        ...

    def current_clocks_event_reasons(self, handle: Handle) -> int:
        """Bitmask of the reasons clocks are held down right now."""
        ...

    def supported_clocks_event_reasons(self, handle: Handle) -> int:
        """Bitmask of the reasons this GPU can report."""
        ...

    def ecc_mode(self, handle: Handle) -> tuple[int, int]:
        """(current, pending) ECC mode, NVML_FEATURE_ENABLED or disabled."""
        ...

    def total_ecc_errors(self, handle: Handle, error_type: int, counter_type: int) -> int: ...

    def compute_processes(self, handle: Handle) -> list[ProcessInfo]: ...


class Pynvml:
    """The real NVML through nvidia-ml-py (module `pynvml`), translating its errors to NvmlError."""

    def __init__(self) -> None:
        self._nv: Any = None

    def init(self) -> None:
        if self._nv is None:
            try:
                import pynvml
            except ImportError as exc:
                raise NvmlError(None, f"nvidia-ml-py is not installed ({exc})") from exc
            self._nv = pynvml
        self._call("nvmlInit")

    def shutdown(self) -> None:
        self._call("nvmlShutdown")

    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount"))

    def handle_by_index(self, index: int) -> Handle:
        handle: Handle = self._call("nvmlDeviceGetHandleByIndex", index)
        return handle

    def uuid(self, handle: Handle) -> str:
        return _text(self._call("nvmlDeviceGetUUID", handle))

    def name(self, handle: Handle) -> str:
        return _text(self._call("nvmlDeviceGetName", handle))

    def utilization_gpu(self, handle: Handle) -> int:
        return int(self._call("nvmlDeviceGetUtilizationRates", handle).gpu)

    def memory_info(self, handle: Handle) -> MemoryInfo:
        info = self._call("nvmlDeviceGetMemoryInfo", handle)
        return MemoryInfo(total=int(info.total), free=int(info.free), used=int(info.used))

    def power_usage(self, handle: Handle) -> int:
        return int(self._call("nvmlDeviceGetPowerUsage", handle))

    def enforced_power_limit(self, handle: Handle) -> int:
        return int(self._call("nvmlDeviceGetEnforcedPowerLimit", handle))

    def temperature(self, handle: Handle) -> int:
        return int(self._call("nvmlDeviceGetTemperature", handle, NVML_TEMPERATURE_GPU))

    def clock(self, handle: Handle, clock_type: int) -> int:
        return int(self._call("nvmlDeviceGetClockInfo", handle, clock_type))

    def current_clocks_event_reasons(self, handle: Handle) -> int:
        return self._reasons(
            "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons", handle
        )

    def supported_clocks_event_reasons(self, handle: Handle) -> int:
        return self._reasons(
            "nvmlDeviceGetSupportedClocksEventReasons", "nvmlDeviceGetSupportedClocksThrottleReasons", handle
        )

    def ecc_mode(self, handle: Handle) -> tuple[int, int]:
        current, pending = self._call("nvmlDeviceGetEccMode", handle)
        return int(current), int(pending)

    def total_ecc_errors(self, handle: Handle, error_type: int, counter_type: int) -> int:
        return int(self._call("nvmlDeviceGetTotalEccErrors", handle, error_type, counter_type))

    def compute_processes(self, handle: Handle) -> list[ProcessInfo]:
        found = self._call("nvmlDeviceGetComputeRunningProcesses", handle)
        return [ProcessInfo(int(p.pid), None if p.usedGpuMemory is None else int(p.usedGpuMemory)) for p in found or []]

    def _reasons(self, name: str, old_name: str, handle: Handle) -> int:
        # Drivers before 535 only have the older "throttle reasons" names of the same call.
        try:
            return int(self._call(name, handle))
        except NvmlError as exc:
            if exc.code != NVML_ERROR_FUNCTION_NOT_FOUND:
                raise
            return int(self._call(old_name, handle))

    def _call(self, name: str, *args: object) -> Any:
        if self._nv is None:
            raise NvmlError(NVML_ERROR_UNINITIALIZED, "NVML is not initialized")
        function = getattr(self._nv, name, None)
        if function is None:
            raise NvmlError(NVML_ERROR_FUNCTION_NOT_FOUND, f"this nvidia-ml-py has no {name}")
        try:
            return function(*args)
        except self._nv.NVMLError as exc:
            raise NvmlError(int(exc.value), str(exc)) from exc


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# -- reading: one round of calls as facts in base units ---------------------------


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    memory_bytes: int | None


@dataclass
class GpuFacts:
    """One GPU as read from NVML. None means absent: not supported here, or the call failed (see errors)."""

    index: int
    uuid: str
    name: str
    utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    temperature_celsius: float | None = None
    sm_clock_hertz: float | None = None
    memory_clock_hertz: float | None = None
    throttle: dict[str, bool] | None = None  # only the reasons this GPU can report
    ecc_errors: dict[str, int] | None = None  # volatile counts; None where unsupported or ECC is off
    processes: list[GpuProcess] | None = None
    unsupported: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NvmlReading:
    up: bool
    reason: str | None  # why NVML is down; None when up
    gpus: list[GpuFacts] | None  # None when NVML is down: no GPU facts at all
    errors: list[str] = field(default_factory=list)  # GPUs that could not be read at all

    @property
    def complete(self) -> bool:
        """Every GPU's compute processes are known, so "no process" is a fact."""
        return self.gpus is not None and not self.errors and all(g.processes is not None for g in self.gpus)


def down(reason: str) -> NvmlReading:
    return NvmlReading(up=False, reason=reason, gpus=None)


class NvmlReader:
    """Owns the NVML session: initialises on first read and again after a failure; each read is time-bounded."""

    def __init__(self, nvml: Nvml, timeout_s: float = NVML_TIMEOUT_S) -> None:
        self.nvml = nvml
        self.timeout_s = timeout_s
        self._ready = False
        self._lock = threading.Lock()
        self._stuck: threading.Thread | None = None
        self._stuck_since = 0.0

    def read(self) -> NvmlReading:
        with self._lock:
            if self._stuck is not None and self._stuck.is_alive():
                waited = time.monotonic() - self._stuck_since
                return down(f"an NVML call has not returned for {waited:.0f} s")
            box: list[NvmlReading] = []
            # A daemon thread, so a call hung in the driver cannot block the agent's exit either.
            worker = threading.Thread(target=lambda: box.append(self._read_now()), name="nvml", daemon=True)
            began = time.monotonic()
            worker.start()
            worker.join(self.timeout_s)
            if worker.is_alive():
                self._stuck, self._stuck_since = worker, began
                return down(f"NVML did not answer within {self.timeout_s:g} s")
            return box[0]

    def close(self) -> None:
        with self._lock:
            if self._ready:
                self._shutdown()

    def _read_now(self) -> NvmlReading:
        try:
            return self._read_devices()
        except Exception as exc:  # a bug or an odd driver answer must read as "down, because", not kill the scrape
            self._shutdown()
            return down(f"reading NVML failed: {type(exc).__name__}: {exc}")

    def _read_devices(self) -> NvmlReading:
        if not self._ready:
            try:
                self.nvml.init()
            except NvmlError as exc:
                return down(f"NVML init failed: {exc}")
            self._ready = True
        try:
            count = self.nvml.device_count()
        except NvmlError as exc:
            self._shutdown()
            return down(f"NVML device count failed: {exc}")
        gpus: list[GpuFacts] = []
        errors: list[str] = []
        for index in range(count):
            try:
                handle = self.nvml.handle_by_index(index)
                facts = GpuFacts(index=index, uuid=self.nvml.uuid(handle), name=self.nvml.name(handle))
            except NvmlError as exc:
                errors.append(f"GPU {index}: {exc}")
                continue
            read_gpu(self.nvml, handle, facts)
            gpus.append(facts)
        return NvmlReading(up=True, reason=None, gpus=gpus, errors=errors)

    def _shutdown(self) -> None:
        """End the session; the next read initialises NVML again (a driver may come back)."""
        self._ready = False
        with contextlib.suppress(Exception):  # shutting down a broken session is best effort
            self.nvml.shutdown()


def read_gpu(nvml: Nvml, handle: Handle, facts: GpuFacts) -> None:
    """Fill ``facts`` from NVML, converting to base units; leave out what this GPU cannot answer."""

    def get(what: str, call: Callable[[], T]) -> T | None:
        try:
            return call()
        except NvmlError as exc:
            if exc.not_supported:
                facts.unsupported.append(what)
            else:
                facts.errors[what] = str(exc)
            return None

    utilization = get("utilization", lambda: nvml.utilization_gpu(handle))
    facts.utilization_ratio = None if utilization is None else utilization / 100
    memory = get("memory", lambda: nvml.memory_info(handle))
    if memory is not None:
        facts.memory_used_bytes, facts.memory_total_bytes = memory.used, memory.total
    power = get("power", lambda: nvml.power_usage(handle))
    facts.power_watts = None if power is None else power / 1000
    limit = get("power_limit", lambda: nvml.enforced_power_limit(handle))
    facts.power_limit_watts = None if limit is None else limit / 1000
    temperature = get("temperature", lambda: nvml.temperature(handle))
    facts.temperature_celsius = None if temperature is None else float(temperature)
    sm = get("sm_clock", lambda: nvml.clock(handle, NVML_CLOCK_SM))
    facts.sm_clock_hertz = None if sm is None else sm * 1e6
    mem = get("memory_clock", lambda: nvml.clock(handle, NVML_CLOCK_MEM))
    facts.memory_clock_hertz = None if mem is None else mem * 1e6
    facts.throttle = throttle_reasons(get, nvml, handle)
    facts.ecc_errors = ecc_errors(get, nvml, handle, facts)
    found = get("processes", lambda: nvml.compute_processes(handle))
    facts.processes = None if found is None else [GpuProcess(p.pid, p.used_gpu_memory) for p in found]


Getter = Callable[[str, Callable[[], Any]], Any]


def throttle_reasons(get: Getter, nvml: Nvml, handle: Handle) -> dict[str, bool] | None:
    current = get("throttle", lambda: nvml.current_clocks_event_reasons(handle))
    if current is None:
        return None
    try:
        supported = nvml.supported_clocks_event_reasons(handle)
    except NvmlError:
        supported = ~0  # unknown: report every reason as the current mask says
    return {reason: bool(current & bits) for reason, bits in THROTTLE_REASONS.items() if supported & bits}


def ecc_errors(get: Getter, nvml: Nvml, handle: Handle, facts: GpuFacts) -> dict[str, int] | None:
    mode = get("ecc_errors", lambda: nvml.ecc_mode(handle))
    if mode is None:
        return None
    if mode[0] != NVML_FEATURE_ENABLED:
        facts.unsupported.append("ecc_errors")  # ECC is off: the counters do not count
        return None
    corrected = get(
        "ecc_errors",
        lambda: nvml.total_ecc_errors(handle, NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_VOLATILE_ECC),
    )
    uncorrected = get(
        "ecc_errors",
        lambda: nvml.total_ecc_errors(handle, NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC),
    )
    if corrected is None or uncorrected is None:
        return None
    return {"corrected": corrected, "uncorrected": uncorrected}
