"""The memory a worker really took on its GPUs (NVML, per process) against the plan's estimate.

The planner books each worker a footprint on each of its GPUs (`Worker.footprint_gib`: the estimate, or what the
backend is told to reserve). The agent sums the GPU memory of the worker's processes per GPU and compares: a miss
of more than MISS_WARN_RATIO either way is a warning with both numbers (a worker that takes more than booked can
starve its neighbours; one that takes far less wastes a GPU the planner thinks is full). The same words reach
the warnings engine (controller/warnings.py: FleetWorkerMemoryOffEstimate, from an agent's /status) and the metrics
`fleet_worker_memory_{measured,estimate}_bytes` and `fleet_worker_memory_estimate_miss_ratio`.

Only a fact is compared: a worker with no process of known memory on a GPU has no measurement there. An on-demand
worker (its model has `swap`) is compared after a load, once this agent has loaded it (residency.py), and no more
once it has unloaded it or put it to sleep (a sleeping vLLM keeps only its CUDA context, far below its booking:
that is no miss); other workers are resident all the time and always compared.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from controller.plan.vram import GIB as GIB  # re-exported: the agent and its tests count in it
from controller.plan.vram import MISS_WARN_RATIO as MISS_WARN_RATIO  # |measured / estimate - 1| beyond it is a warning


@dataclass(frozen=True)
class MemoryCheck:
    """One worker: its booked bytes per GPU, what its processes hold on each GPU they are on, and the worst miss."""

    worker: str
    estimate_bytes: int  # per GPU, as the plan books it
    planned: list[str]  # the worker's GPU UUIDs
    measured: dict[str, int]  # GPU UUID → bytes its processes hold there (only GPUs where that is known)
    compared: bool  # False: an on-demand worker this agent has not loaded (or has unloaded): no miss computed

    @property
    def worst(self) -> str | None:
        """The GPU whose measurement is furthest from the estimate, or None with nothing to compare."""
        if not self.compared or not self.measured or self.estimate_bytes <= 0:
            return None
        return max(sorted(self.measured), key=lambda uuid: abs(self.measured[uuid] / self.estimate_bytes - 1))

    @property
    def miss_ratio(self) -> float | None:
        """measured / estimate - 1 on the worst GPU (+0.16: took 16 % more than booked); None: nothing compared."""
        worst = self.worst
        return None if worst is None else self.measured[worst] / self.estimate_bytes - 1

    @property
    def warning(self) -> str | None:
        worst = self.worst
        if worst is None:
            return None
        return memory_warning(self.worker, worst, self.measured[worst], self.estimate_bytes)

    @property
    def measured_gib(self) -> float | None:
        """The most it holds on any one GPU, in GiB (the estimate is per GPU too); None when nothing is measured."""
        return round(max(self.measured.values()) / GIB, 2) if self.measured else None

    def as_dict(self) -> dict[str, Any]:
        ratio = self.miss_ratio
        return {
            "estimate_gib": round(self.estimate_bytes / GIB, 2),
            "measured_gib": {uuid: round(b / GIB, 2) for uuid, b in sorted(self.measured.items())},
            "miss_ratio": None if ratio is None else round(ratio, 4),
            "compared": self.compared,
        }


def measure(
    worker: str,
    footprint_gib: float,
    planned: Iterable[str],
    processes: Iterable[tuple[str, int, int | None]],
    compared: bool = True,
) -> MemoryCheck:
    """``processes``: (GPU UUID, PID, bytes or None) of the worker's GPU processes, as the agent maps them."""
    measured: dict[str, int] = {}
    for uuid, _, used in processes:
        if used is not None:
            measured[uuid] = measured.get(uuid, 0) + used
    return MemoryCheck(worker, round(footprint_gib * GIB), sorted(planned), measured, compared)


def memory_warning(worker: str, gpu: str, measured_bytes: int, estimate_bytes: int) -> str | None:
    """ "worker X took 9.31 GiB on GPU-…, the estimate was 8.02 GiB (+16 %)", or None within MISS_WARN_RATIO."""
    if estimate_bytes <= 0:
        return None
    ratio = measured_bytes / estimate_bytes - 1
    if abs(ratio) <= MISS_WARN_RATIO:
        return None
    return (
        f"worker {worker} took {measured_bytes / GIB:.2f} GiB on {gpu}, "
        f"the estimate was {estimate_bytes / GIB:.2f} GiB ({ratio * 100:+.0f} %)"
    )
