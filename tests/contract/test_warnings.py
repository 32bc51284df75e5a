"""The warnings engine and the Prometheus alerts agree (issue 15: "so the three never disagree").

For each scenario, agent snapshots of every GPU host of the example are built from the agent's own dataclasses; the
engine (controller/warnings.py) reads their /status (controller/agent/service.py `status`, what the console and
`controller status` read), and promtool reads their metrics (`metric_families`, what Prometheus scrapes) through the
rendered rules. For every alert the engine evaluates from agent facts, promtool must fire exactly the alerts the
engine reports: the same names, labels and annotations, no more and no fewer. Scenarios: all well; every fault at
once; every value just short of its threshold.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.agent.memory import GIB, MISS_WARN_RATIO, measure
from controller.agent.nvml import GpuFacts, GpuProcess, NvmlReading
from controller.agent.service import Health, Pinning, Snapshot, WorkerView, metric_families, status
from controller.plan import Plan
from controller.plan.models import Worker
from controller.render.rules import alerts, rules
from controller.warnings import CHECKS, PROMETHEUS_ONLY, Facts, evaluate, fill
from tests.conftest import need_tool, run
from tests.contract.test_monitoring import PROMTOOL_HINT

pytestmark = pytest.mark.contract

# The engine's checks that read only agents' /status, so that the metrics of the same snapshots decide the alerts.
FROM_AGENTS = [
    "FleetWorkerDown",
    "FleetGpuThermalThrottling",
    "FleetGpuHardwareSlowdown",
    "FleetGpuTemperatureHigh",
    "FleetGpuPowerCapThrottling",
    "FleetGpuMemoryNearlyFull",
    "FleetWorkerWrongGpu",
    "FleetWorkerMemoryOnManyGpus",
    "FleetWorkerMemoryOffEstimate",
    "FleetWorkerModelMissing",
    "FleetGpuUnmanagedProcess",
    "FleetAgentNvmlDown",
]
STRAY_PID = 999_999


def test_every_alert_is_in_the_engine_or_said_to_be_prometheus_only(example_plan: Plan) -> None:
    names = {a.name for a in alerts(example_plan)}
    assert set(CHECKS) | set(PROMETHEUS_ONLY) == names
    assert not set(CHECKS) & set(PROMETHEUS_ONLY)


Scenario = Callable[[Plan, Worker], dict[str, Any]]


def gpu_facts(plan: Plan, host: str, faults: dict[str, Any], held: dict[str, list[GpuProcess]]) -> list[GpuFacts]:
    """``held``: GPU UUID → the workers' processes on it."""
    out = []
    for use in plan.gpus:
        g = use.gpu
        if g.host != host:
            continue
        total = int(g.vram_gib * GIB)
        hot = faults.get("gpu") == g.uuid
        t = plan.fleet.observability.thresholds
        procs = list(held.get(g.uuid, []))
        if hot and faults.get("stray"):
            procs.append(GpuProcess(STRAY_PID, GIB))
        out.append(
            GpuFacts(
                index=g.index,
                uuid=g.uuid,
                name=g.name,
                utilization_ratio=0.5,
                memory_used_bytes=round(total * (faults["used_ratio"] if hot else 0.5)),
                memory_total_bytes=total,
                power_watts=200.0,
                power_limit_watts=300.0,
                temperature_celsius=faults["temp"] if hot else t.gpu_temp_c - 20,
                throttle={r: hot and r in faults.get("throttle", ()) for r in ("thermal", "power_cap", "hw_slowdown")},
                processes=procs,
            )
        )
    return out


def snapshot(plan: Plan, host: str, faults: dict[str, Any]) -> Snapshot:
    nvml_up = host != faults.get("nvml_down")
    owners: dict[int, str | None] = {STRAY_PID: None}
    views: list[WorkerView] = []
    for w in plan.workers_on(host):
        sick = w.name == faults.get("worker")
        planned = [g.uuid for g in w.gpus]
        booked = round(w.footprint_gib * GIB)
        held = round(booked * (1 + faults["miss"])) if sick else booked
        others = [u.gpu.uuid for u in plan.gpus if u.gpu.host == host and u.gpu.uuid not in planned]
        on = planned + (others[:1] if sick and faults.get("spread") else [])
        if sick and faults.get("wrong_gpu") and others:
            on = others[:1]
        procs = [(uuid, 5000 + 10 * len(views) + i, held) for i, uuid in enumerate(on)] if w.gpus and nvml_up else []
        for _, pid, _ in procs:
            owners[pid] = w.name
        pin = (
            Pinning("wrong_gpu", "processes on another GPU") if sick and faults.get("wrong_gpu") else Pinning("ok", "")
        )
        up = not (sick and faults.get("down"))
        health = Health(f"http://{w.address}:{w.port}/health", up, 0.01 if up else None, None if up else "HTTP 503")
        missing = (["missing-name"] if sick and faults.get("model_missing") else []) if up else None
        memory = measure(w.name, w.footprint_gib, planned, procs) if w.gpus else None
        views.append(WorkerView(w, pin, health, procs, memory, missing))
    on_gpus: dict[str, list[GpuProcess]] = {}
    for view in views:
        for uuid, pid, used in view.processes:
            on_gpus.setdefault(uuid, []).append(GpuProcess(pid, used))
    if nvml_up:
        reading = NvmlReading(up=True, reason=None, gpus=gpu_facts(plan, host, faults, on_gpus))
    else:
        reading = NvmlReading(up=False, reason="NVML Shared Library Not Found", gpus=None)
    return Snapshot(host, time.monotonic(), reading, owners, views, [])


def all_well(plan: Plan, w: Worker) -> dict[str, Any]:
    return {}


def every_fault(plan: Plan, w: Worker) -> dict[str, Any]:
    t = plan.fleet.observability.thresholds
    other = next((h.name for h in plan.fleet.hosts or [] if h.gpus and h.name != w.host), None)
    return {
        "gpu": w.gpus[0].uuid,
        "temp": t.gpu_temp_c + 5,
        "used_ratio": (1 + t.vram_used_ratio) / 2,
        "throttle": ("thermal", "power_cap", "hw_slowdown"),
        "stray": True,
        "worker": w.name,
        "miss": 0.3,
        "spread": True,
        "down": False,  # a down worker lists nothing: its missing names are unknown
        "model_missing": True,
        "nvml_down": other,
    }


def a_down_worker_on_the_wrong_gpu(plan: Plan, w: Worker) -> dict[str, Any]:
    return {"worker": w.name, "miss": 0.0, "down": True, "wrong_gpu": True}


def near_misses(plan: Plan, w: Worker) -> dict[str, Any]:
    t = plan.fleet.observability.thresholds
    return {
        "gpu": w.gpus[0].uuid,
        "temp": t.gpu_temp_c - 0.5,
        "used_ratio": t.vram_used_ratio * 0.99,
        "throttle": (),
        "worker": w.name,
        "miss": MISS_WARN_RATIO * 0.9,
    }


def input_series(plan: Plan, snaps: list[Snapshot]) -> list[dict[str, str]]:
    """The snapshots' metrics as Prometheus stores them: the agents job's target labels added (the agent's own
    labels win, `honor_labels`), one sample a minute for an hour."""
    out = []
    for snap in snaps:
        h = plan.host(snap.host)
        target = {"job": "agents", "instance": f"{h.address}:{h.agent_port}", "host": snap.host}
        for family in metric_families(snap):
            for sample in family.samples:
                labels = {**target, **sample.labels}
                body = ",".join(f'{k}="{v}"' for k, v in labels.items())
                out.append({"series": f"{sample.name}{{{body}}}", "values": f"{sample.value!r}x60"})
    return out


@pytest.mark.parametrize("scenario", [all_well, every_fault, a_down_worker_on_the_wrong_gpu, near_misses])
def test_the_engine_and_the_alerts_agree(example_plan: Plan, tmp_path: Path, scenario: Scenario) -> None:
    promtool = need_tool("promtool", PROMTOOL_HINT)
    plan = example_plan
    on_demand = {x.name for x in plan.on_demand()}
    w = next((x for x in plan.workers if len(x.gpus) == 1 and x.name not in on_demand), None)
    w = w or next(x for x in plan.workers if len(x.gpus) == 1)
    faults = scenario(plan, w)
    hosts = [h.name for h in plan.fleet.hosts or [] if plan.workers_on(h.name) or h.gpus]
    snaps = [snapshot(plan, h, faults) for h in hosts]
    found = evaluate(plan, Facts(agents={s.host: status(s) for s in snaps}))
    if scenario is every_fault:
        wanted = set(FROM_AGENTS) - {"FleetWorkerDown", "FleetWorkerWrongGpu"}
        if faults["nvml_down"] is None:  # one GPU host: no other host to lose NVML on
            wanted.discard("FleetAgentNvmlDown")
        if len([u for u in plan.gpus if u.gpu.host == w.host]) < 2:  # one GPU on the host: nowhere to spread to
            wanted.discard("FleetWorkerMemoryOnManyGpus")
        assert {x.code for x in found} >= wanted
    if scenario is a_down_worker_on_the_wrong_gpu:
        assert {x.code for x in found} >= {"FleetWorkerWrongGpu"} | (
            set() if w.name in on_demand else {"FleetWorkerDown"}
        )
    if scenario in (all_well, near_misses):
        assert not found, [x.message for x in found]

    rendered = {a["alert"]: a for a in rules(plan)["groups"][2]["rules"]}
    tests = []
    for code in FROM_AGENTS:
        rule = rendered[code]
        expected = []
        for x in found:
            if x.code == code:
                labels = {**x.subject, "severity": x.severity}
                assert x.summary == fill(rule["annotations"]["summary"], labels)
                expected.append(
                    {
                        "exp_labels": labels,
                        "exp_annotations": {k: fill(v, labels) for k, v in rule["annotations"].items()},
                    }
                )
        tests.append({"eval_time": "45m", "alertname": code, "exp_alerts": expected})
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules(plan), sort_keys=False, width=1000, allow_unicode=True))
    test_file = tmp_path / "agree.test.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": ["rules.yml"],
                "evaluation_interval": "1m",
                "group_eval_order": ["fleet-inventory", "fleet-recording", "fleet-alerts"],
                "tests": [
                    {
                        "name": scenario.__name__,
                        "interval": "1m",
                        "input_series": input_series(plan, snaps),
                        "alert_rule_test": tests,
                    }
                ],
            },
            sort_keys=False,
            width=1000,
            allow_unicode=True,
        )
    )
    result = run([promtool, "test", "rules", str(test_file)])
    assert result.returncode == 0, result.stdout + result.stderr
