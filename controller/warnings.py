"""The warnings engine: one catalogue of what is wrong with a fleet, shared by the console, `controller status` and
the Prometheus alerts.

Every warning is one of the on-call alerts of controller/render/rules.py, under the alert's own name, severity,
summary and runbook section: the engine evaluates the alert's condition on the facts its caller holds (an agent's
/status, the gateway's view of the workers, the served certificate), the alert evaluates the same condition on the
series the same programs export. tests/contract/test_warnings.py builds agent snapshots, hands the engine their
/status and promtool their metrics, and requires the same alerts from both. The one difference is time: an alert
waits its `for` before it fires, the engine says what holds now (the console is for "right now").

The catalogue (CHECKS) covers every alert whose condition is a present fact. The rate alerts (latency, time to first
token, error ratio, ECC errors in the last hour) need Prometheus's history and stay with it; so do the scrape-only
ones (FleetGatekeeperDown, FleetEnvoyDown: the console runs in the gatekeeper and says when Envoy does not answer).

On-demand workers (their model has `swap`) are never FleetWorkerDown: unloaded on purpose and dead look the same to a
health check, in Prometheus and here alike; their card says which (resident, loading, idle).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from controller.plan.models import Plan
from controller.plan.vram import GIB, MISS_WARN_RATIO
from controller.render.rules import Alert, alerts

Labels = dict[str, str]
Found = Iterator[tuple[Labels, str]]  # the alert's labels, and the evidence in words with its numbers


@dataclass(frozen=True)
class Facts:
    """What a caller knows now; a source that was not asked is empty, one that did not answer is None."""

    agents: Mapping[str, dict[str, Any] | None] = field(default_factory=dict)  # host → agent /status, None: no answer
    workers_up: Mapping[str, bool] = field(default_factory=dict)  # worker → healthy as the gateway routes by it
    queues: Mapping[str, int] = field(default_factory=dict)  # model → requests in flight and waiting at the gateway
    cert_expiry: float | None = None  # unix time the served certificate expires; None: not known
    now: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Warning:
    code: str  # the alert's name
    severity: str
    subject: Labels  # the alert's labels (without alertname and severity)
    summary: str  # the alert's summary with its labels filled in
    evidence: str
    runbook: str

    @property
    def message(self) -> str:
        return f"{self.summary}: {self.evidence}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "subject": self.subject,
            "summary": self.summary,
            "evidence": self.evidence,
            "message": self.message,
            "runbook": self.runbook,
        }


def evaluate(plan: Plan, facts: Facts) -> list[Warning]:
    """Every warning that holds on ``facts``, most severe first, then by code and subject."""
    catalogue = {a.name: a for a in alerts(plan)}
    out = []
    for code, check in CHECKS.items():
        alert = catalogue[code]
        for labels, evidence in check(plan, facts):
            out.append(
                Warning(
                    code,
                    alert.severity,
                    labels,
                    fill(alert.summary, labels),
                    evidence,
                    alert.rule()["annotations"]["runbook"],
                )
            )
    rank = {"critical": 0, "warning": 1, "info": 2}
    return sorted(out, key=lambda w: (rank.get(w.severity, 3), w.code, sorted(w.subject.items())))


_LABEL = re.compile(r"\{\{ \$labels\.(\w+) \}\}")


def fill(template: str, labels: Labels) -> str:
    """An alert annotation with its `{{ $labels.x }}` filled in, as Prometheus does."""
    return _LABEL.sub(lambda m: labels.get(m.group(1), ""), template)


# -- the checks, one per alert --------------------------------------------------------------------------------------


def _docs(facts: Facts) -> Iterator[tuple[str, dict[str, Any]]]:
    for host, doc in sorted(facts.agents.items()):
        if isinstance(doc, dict):
            yield host, doc


def _gpus(facts: Facts) -> Iterator[tuple[Labels, dict[str, Any]]]:
    for host, doc in _docs(facts):
        for gpu in doc.get("gpus") or []:
            yield {"host": host, "index": str(gpu.get("index")), "uuid": str(gpu.get("uuid"))}, gpu


def _workers(facts: Facts) -> Iterator[tuple[str, dict[str, Any]]]:
    for host, doc in _docs(facts):
        for worker in doc.get("workers") or []:
            if isinstance(worker, dict):
                yield host, worker


def worker_down(plan: Plan, facts: Facts) -> Found:
    on_demand = {w.name for w in plan.on_demand()}
    agent_view = {w.get("name"): w for _, w in _workers(facts)}
    for w in plan.workers:
        if w.name in on_demand:
            continue
        why = []
        if facts.workers_up.get(w.name) is False:
            why.append("the gateway's health checks fail")
        health = (agent_view.get(w.name) or {}).get("health") or {}
        if health.get("up") is False:
            why.append(f"the agent's health check of {health.get('url')} got {health.get('error') or 'no 200'}")
        if why:
            yield {"worker": w.name, "model": w.model, "host": w.host}, "; ".join(why)


def model_unavailable(plan: Plan, facts: Facts) -> Found:
    on_demand = {w.name for w in plan.on_demand()}
    for model in plan.fleet.models:
        workers = [w for w in plan.workers if w.model == model.name]
        if not workers or any(w.name in on_demand for w in workers):
            continue
        seen = [facts.workers_up.get(w.name) for w in workers]
        if all(s is False for s in seen):
            yield {"model": model.name}, f"0 of {len(workers)} replicas healthy"


def throttling(reason: str, words: str) -> Callable[[Plan, Facts], Found]:
    def check(plan: Plan, facts: Facts) -> Found:
        for labels, gpu in _gpus(facts):
            if (gpu.get("throttle") or {}).get(reason) is True:
                yield labels, f"NVML reports {words} throttling now"

    return check


def temperature_high(plan: Plan, facts: Facts) -> Found:
    limit = plan.fleet.observability.thresholds.gpu_temp_c
    for labels, gpu in _gpus(facts):
        temp = gpu.get("temperature_celsius")
        if temp is not None and float(temp) > limit:
            yield labels, f"{float(temp):g} °C, above {limit:g} °C"


def memory_nearly_full(plan: Plan, facts: Facts) -> Found:
    ratio = plan.fleet.observability.thresholds.vram_used_ratio
    for labels, gpu in _gpus(facts):
        used, total = gpu.get("memory_used_bytes"), gpu.get("memory_total_bytes")
        if used is not None and total and used / total > ratio:
            yield (
                labels,
                (
                    f"{used / GIB:.2f} of {total / GIB:.2f} GiB in use ({used / total * 100:.1f} %, "
                    f"above {ratio * 100:g} %)"
                ),
            )


def unmanaged_process(plan: Plan, facts: Facts) -> Found:
    for labels, gpu in _gpus(facts):
        if (gpu.get("unmanaged_processes") or 0) > 0:
            strays = [p for p in gpu.get("processes") or [] if p.get("worker") is None]
            listed = ", ".join(f"PID {p.get('pid')} ({(p.get('memory_bytes') or 0) / GIB:.2f} GiB)" for p in strays)
            yield labels, f"{gpu['unmanaged_processes']} process(es) no worker owns: {listed}"


def wrong_gpu(plan: Plan, facts: Facts) -> Found:
    for host, w in _workers(facts):
        if w.get("pinning") == "wrong_gpu":
            yield {"worker": str(w["name"]), "model": str(w.get("model")), "host": host}, str(w.get("pinning_reason"))


def memory_on_many_gpus(plan: Plan, facts: Facts) -> Found:
    for host, w in _workers(facts):
        measured = (w.get("memory") or {}).get("measured_gib") or {}
        planned = w.get("gpus") or []
        if planned and len(measured) > len(planned):
            on = ", ".join(f"{uuid} {gib:.2f} GiB" for uuid, gib in sorted(measured.items()))
            yield (
                {"worker": str(w["name"]), "host": host},
                f"memory on {len(measured)} GPUs ({on}), planned on {len(planned)}",
            )


def memory_off_estimate(plan: Plan, facts: Facts) -> Found:
    for host, w in _workers(facts):
        ratio = (w.get("memory") or {}).get("miss_ratio")
        if ratio is not None and abs(float(ratio)) > MISS_WARN_RATIO:
            yield {"worker": str(w["name"]), "host": host}, str(w.get("memory_warning") or f"{ratio * 100:+.0f} %")


def model_missing(plan: Plan, facts: Facts) -> Found:
    for host, w in _workers(facts):
        missing = w.get("missing_names")
        if missing:
            yield (
                {"worker": str(w["name"]), "model": str(w.get("model")), "host": host},
                f"it does not list {', '.join(missing)}",
            )


def queue_growing(plan: Plan, facts: Facts) -> Found:
    depth = plan.fleet.observability.thresholds.queue_depth
    for model, queued in sorted(facts.queues.items()):
        if queued > depth:
            yield {"model": model}, f"{queued} requests in flight or waiting, above {depth}"


def agent_down(plan: Plan, facts: Facts) -> Found:
    for host, doc in sorted(facts.agents.items()):
        if doc is None:
            yield {"host": host}, "its /status does not answer"


def agent_nvml_down(plan: Plan, facts: Facts) -> Found:
    with_gpus = {h.name for h in plan.fleet.hosts or [] if h.gpus}
    for host, doc in _docs(facts):
        nvml = doc.get("nvml") or {}
        if host in with_gpus and nvml.get("up") is False:
            yield {"host": host}, str(nvml.get("reason") or "NVML does not answer")


def certificate_expiring(plan: Plan, facts: Facts) -> Found:
    if facts.cert_expiry is None:
        return
    left = facts.cert_expiry - facts.now
    internal = plan.fleet.gateway.tls.mode == "internal"
    days = plan.fleet.observability.thresholds.cert_expiry_days
    if left < (3600 if internal else days * 86400):
        when = f"{left / 3600:.1f} hours" if left < 2 * 86400 else f"{left / 86400:.1f} days"
        yield {"domain": plan.fleet.gateway.public_name}, f"it expires in {when}"


CHECKS: dict[str, Callable[[Plan, Facts], Found]] = {
    "FleetWorkerDown": worker_down,
    "FleetModelUnavailable": model_unavailable,
    "FleetGpuThermalThrottling": throttling("thermal", "thermal"),
    "FleetGpuHardwareSlowdown": throttling("hw_slowdown", "hardware slowdown"),
    "FleetGpuTemperatureHigh": temperature_high,
    "FleetGpuPowerCapThrottling": throttling("power_cap", "power-cap"),
    "FleetGpuMemoryNearlyFull": memory_nearly_full,
    "FleetWorkerWrongGpu": wrong_gpu,
    "FleetWorkerMemoryOnManyGpus": memory_on_many_gpus,
    "FleetWorkerMemoryOffEstimate": memory_off_estimate,
    "FleetWorkerModelMissing": model_missing,
    "FleetGpuUnmanagedProcess": unmanaged_process,
    "FleetModelQueueGrowing": queue_growing,
    "FleetAgentDown": agent_down,
    "FleetAgentNvmlDown": agent_nvml_down,
    "FleetTlsCertificateExpiring": certificate_expiring,
}
# The alerts the engine leaves to Prometheus, and why (the contract test requires every alert in one of the two).
PROMETHEUS_ONLY = {
    "FleetGpuEccErrors": "errors in the last hour: a counter's increase over time",
    "FleetModelLatencyHigh": "a 95th percentile over five minutes",
    "FleetModelTimeToFirstTokenHigh": "a 95th percentile over five minutes",
    "FleetModelErrorRateHigh": "a ratio of rates over five minutes",
    "FleetGatekeeperDown": "a failed scrape of the gatekeeper, which serves the console",
    "FleetEnvoyDown": "a failed scrape; the console shows Envoy's answer as a source",
}


def catalogue(plan: Plan) -> list[Alert]:
    """The alerts of the plan the engine evaluates."""
    return [a for a in alerts(plan) if a.name in CHECKS]
