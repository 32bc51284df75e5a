"""The plan: where every replica runs, on which port, with what estimate.

Plain pydantic data, so ``controller plan --json`` is a dump and the
renderers read typed fields. The plan carries the spec it came from.
"""

from __future__ import annotations

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
    total_gib: float
    # How each term was computed, for humans reading `controller plan`.
    basis: dict[str, str]


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


class GpuUse(PlanModel):
    gpu: GpuRef
    usable_gib: float
    used_gib: float
    workers: list[str]

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
        for model in self.fleet.models:
            if model.name == name:
                return model
        raise KeyError(name)

    def workers_on(self, host: str) -> list[Worker]:
        return [w for w in self.workers if w.host == host]

    def workers_of(self, model: str) -> list[Worker]:
        return [w for w in self.workers if w.model == model]

    @property
    def gateway_host(self) -> Host:
        return self.fleet.host(self.fleet.gateway.host)

    def summary(self) -> dict[str, Any]:
        """The plan as data for `--json`, without repeating the whole spec."""
        return {
            "fleet": self.fleet.name,
            "workers": [w.model_dump(mode="json") for w in self.workers],
            "gpus": [{**g.model_dump(mode="json"), "headroom_gib": g.headroom_gib} for g in self.gpus],
        }
