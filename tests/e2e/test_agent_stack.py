"""The host agent inside `controller up`: it runs, knows the stack's workers, and says what NVML can tell."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.doubles.nvml import real_nvml_problem
from tests.e2e.stack import Stack, pid_alive

pytestmark = pytest.mark.e2e


def test_agent_reports_the_stacks_workers(stack: Stack) -> None:
    agent = stack.processes()["agent"]
    assert agent["kind"] == "agent" and agent["state"] == "healthy" and pid_alive(agent["pid"])
    status = httpx.get(f"http://127.0.0.1:{stack.ports.agent}/status", timeout=10).json()
    assert status["host"] == "local"
    workers = {w["name"]: w for w in status["workers"]}
    assert sorted(workers) == sorted(stack.workers())
    for worker in workers.values():
        assert worker["gpus"] == [] and worker["pinning"] == "ok", worker  # CPU workers, on no GPU
        assert worker["health"]["up"] is True and worker["health"]["latency_seconds"] > 0
    problem = real_nvml_problem()
    if problem is None:
        assert status["nvml"]["up"] is True
    else:  # no GPU here: NVML is down, and says why
        assert status["nvml"]["up"] is False and problem in status["nvml"]["reason"]
        assert status["gpus"] == []


def test_agent_metrics_for_the_stack(stack: Stack) -> None:
    text = httpx.get(f"http://127.0.0.1:{stack.ports.agent}/metrics", timeout=10).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples}
    for name, row in stack.workers().items():
        model = row["model"]
        assert value[("fleet_worker_up", (("model", model), ("worker", name)))] == 1
        assert value[("fleet_worker_pinning", (("model", model), ("state", "ok"), ("worker", name)))] == 1
        assert value[("fleet_worker_pinning", (("model", model), ("state", "not_found"), ("worker", name)))] == 0
    nvml_up = value[("fleet_agent_nvml_up", (("host", "local"),))]
    assert nvml_up == (1 if real_nvml_problem() is None else 0)
    if nvml_up == 0:
        assert not [s for s in samples if s.name.startswith("fleet_gpu_")]
