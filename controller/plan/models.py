"""The plan: where every replica runs, on which port, with what estimate.

Plain pydantic data, so ``controller plan --json`` is a dump and the
renderers read typed fields. The plan carries the spec it came from.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from controller.spec.models import Fleet, Host, Model


class PlanModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Estimate(PlanModel):
    """Memory one replica needs on each of its GPUs, term by term (GiB)."""

    weights_gib: float
    kv_cache_gib: float
    overhead_gib: float
    # The sum of every term: weights, KV cache, compute, graphs, draft, overhead.
    total_gib: float
    # How each term was computed, for humans reading `controller plan`.
    basis: dict[str, str]
    # Activation peak (vLLM's profiling run) or compute buffers (llama.cpp, Ollama).
    compute_gib: float = 0.0
    # vLLM's CUDA graphs.
    graphs_gib: float = 0.0
    # Speculative decoding: the draft model's weights, KV cache and compute buffers.
    draft_gib: float = 0.0
    # Not a term: the part of total_gib that vLLM takes outside `--gpu-memory-utilization` (its CUDA context
    # and CUDA graphs), so the fraction comes from total_gib less this while the GPU books all of total_gib.
    outside_utilization_gib: float = 0.0
    # Not a term: what a sleeping vLLM worker (sleep level 1) still holds on each GPU; None for other backends and
    # for a vLLM model that unloads by stopping (`swap.unload: stop`).
    sleep_residue_gib: float | None = None

    def terms(self) -> dict[str, float]:
        """The terms that add up to total_gib, by name (weights, kv cache, …), the zero ones left out."""
        named = {
            "weights": self.weights_gib,
            "kv cache": self.kv_cache_gib,
            "compute": self.compute_gib,
            "graphs": self.graphs_gib,
            "draft": self.draft_gib,
            "overhead": self.overhead_gib,
        }
        return {k: v for k, v in named.items() if v}


class GpuRef(PlanModel):
    host: str
    index: int
    uuid: str
    name: str
    vram_gib: float

    @property
    def cdi(self) -> str:
        """The CDI device name that pins a container to exactly this GPU."""
        return f"nvidia.com/gpu={self.uuid}"

    @property
    def label(self) -> str:
        return f"{self.host}/gpu{self.index}"


class Worker(PlanModel):
    name: str  # deterministic per (model, host, GPUs, replica on those GPUs)
    model: str
    served_names: list[str]
    replica: int  # 1-based, in placement order
    backend: Literal["vllm", "ollama", "llamacpp"]
    device: Literal["gpu", "cpu"]
    host: str
    address: str
    port: int
    gpus: list[GpuRef]
    estimate: Estimate
    # Settings derived from the estimate that make it true at run time
    # (vLLM --gpu-memory-utilization/--max-model-len, llama.cpp ctx/slots, …).
    settings: dict[str, Any]

    @property
    def footprint_gib(self) -> float:
        """Memory this worker will actually take on each of its GPUs."""
        return float(self.settings.get("reserved_gib", self.estimate.total_gib))

    @property
    def asleep_gib(self) -> float:
        """Memory it keeps on each of its GPUs while unloaded: a sleeping vLLM's residue (its process stays up),
        nothing for the backends that unload by stopping (llama.cpp) or by freeing the model (Ollama)."""
        return min(self.footprint_gib, self.estimate.sleep_residue_gib or 0.0)


class GpuUse(PlanModel):
    gpu: GpuRef
    usable_gib: float
    used_gib: float
    workers: list[str]
    # A GPU of a swap group: the group's name, and the memory its on-demand workers may fill at once (what the
    # other workers leave); `used_gib` counts only the group's always-resident workers.
    swap_group: str | None = None
    swap_capacity_gib: float | None = None

    @property
    def headroom_gib(self) -> float:
        return round(self.usable_gib - self.used_gib, 2)


class Plan(PlanModel):
    fleet: Fleet
    workers: list[Worker]
    gpus: list[GpuUse]

    def host(self, name: str) -> Host:
        return self.fleet.host(name)

    def model(self, name: str) -> Model:
        return self._models[name]  # KeyError for a model not in the spec

    def workers_on(self, host: str) -> list[Worker]:
        return list(self._by_host.get(host, ()))

    def workers_of(self, model: str) -> list[Worker]:
        return list(self._by_model.get(model, ()))

    # Indexes made once per plan (a plan is frozen): renderers ask these for every worker, and a walk of the
    # fleet's models or workers each time made a large fleet's render grow with its square (issue 17).
    @functools.cached_property
    def _models(self) -> dict[str, Model]:
        return {m.name: m for m in self.fleet.models}

    @functools.cached_property
    def _by_host(self) -> dict[str, list[Worker]]:
        return _grouped(self.workers, lambda w: w.host)

    @functools.cached_property
    def _by_model(self) -> dict[str, list[Worker]]:
        return _grouped(self.workers, lambda w: w.model)

    def on_demand(self) -> list[Worker]:
        """Workers the swap coordinator loads and unloads (their model has `swap`), always-resident ones included."""
        return [w for w in self.workers if self.model(w.model).swap is not None]

    def resident_at_most(self, use: GpuUse) -> list[str]:
        """The most on-demand workers of a swap group's GPU that can be resident at once: the smallest first, up to
        what the group may fill (always-resident ones count in, and every sleeping vLLM's residue is held
        whichever are loaded)."""
        if use.swap_capacity_gib is None:
            return []
        workers = [w for n in use.workers if (w := self._by_name.get(n)) and self.model(w.model).swap is not None]
        always = {w.name for w in workers if self.always_resident(w)}

        def extra(w: Worker) -> float:  # what loading it adds to what it holds unloaded
            return w.footprint_gib - (0.0 if w.name in always else w.asleep_gib)

        room = use.swap_capacity_gib - sum(w.asleep_gib for w in workers if w.name not in always)
        out = []
        for w in sorted(workers, key=lambda w: (w.name not in always, extra(w), w.name)):
            if extra(w) <= room + 1e-9:
                room -= extra(w)
                out.append(w.name)
        return out

    def worker(self, name: str) -> Worker:
        return self._by_name[name]  # KeyError for a worker not in the plan

    def always_resident(self, worker: Worker) -> bool:
        swap = self.model(worker.model).swap
        return swap is not None and swap.resident == "always"

    @functools.cached_property
    def _by_name(self) -> dict[str, Worker]:
        return {w.name: w for w in self.workers}

    @property
    def gateway_host(self) -> Host:
        return self.fleet.host(self.fleet.gateway.host)

    def summary(self) -> dict[str, Any]:
        """The plan as data for `--json`, without repeating the whole spec."""
        return {
            "fleet": self.fleet.name,
            "workers": [w.model_dump(mode="json") for w in self.workers],
            "gpus": [
                {
                    **g.model_dump(mode="json"),
                    "headroom_gib": g.headroom_gib,
                    **({"resident_at_most": self.resident_at_most(g)} if g.swap_group else {}),
                }
                for g in self.gpus
            ],
        }


def _grouped(workers: list[Worker], key: Callable[[Worker], str]) -> dict[str, list[Worker]]:
    """``workers`` by ``key``, each group in plan order."""
    out: dict[str, list[Worker]] = {}
    for w in workers:
        out.setdefault(key(w), []).append(w)
    return out
