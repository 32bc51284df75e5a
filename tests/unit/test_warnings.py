"""The warnings engine on the facts only the gateway holds (Envoy's view, queues, the certificate), and the console's
reading of its own picture. Agreement with the Prometheus alerts on the agents' facts: tests/contract/test_warnings.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from controller.console.warnings import console_facts, console_warnings
from controller.plan import Plan, make_plan
from controller.spec import load_spec
from controller.warnings import Facts, evaluate

EXAMPLES = Path(__file__).parents[2] / "examples"


def plan_of(name: str) -> Plan:
    return make_plan(load_spec(EXAMPLES / name))


def codes(plan: Plan, facts: Facts) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for w in evaluate(plan, facts):
        out.setdefault(w.code, []).append(w.subject)
    return out


def test_a_worker_the_gateway_finds_down_is_named_with_its_model_and_host() -> None:
    plan = plan_of("homelab.yaml")
    w = plan.workers[0]
    found = evaluate(plan, Facts(workers_up={w.name: False}))
    (down,) = [x for x in found if x.code == "FleetWorkerDown"]
    assert down.subject == {"worker": w.name, "model": w.model, "host": w.host}
    assert down.message == f"worker {w.name} of {w.model} on {w.host} is down: the gateway's health checks fail"
    assert down.runbook.endswith("RUNBOOK.md#fleetworkerdown") and down.severity == "warning"
    assert not evaluate(plan, Facts(workers_up={w.name: True}))


def test_a_model_with_every_replica_down_is_unavailable_and_sorted_first() -> None:
    plan = plan_of("homelab.yaml")
    model = next(m.name for m in plan.fleet.models if len(plan.workers_of(m.name)) >= 1)
    workers = plan.workers_of(model)
    found = evaluate(plan, Facts(workers_up={w.name: False for w in workers}))
    assert found[0].code == "FleetModelUnavailable" and found[0].severity == "critical"
    assert found[0].subject == {"model": model}
    assert f"0 of {len(workers)} replicas healthy" in found[0].message
    # Health not known for a replica: not "no healthy replica".
    assert "FleetModelUnavailable" not in codes(
        plan, Facts(workers_up={workers[0].name: False} if len(workers) > 1 else {})
    )


def test_on_demand_workers_are_never_down() -> None:
    plan = plan_of("on-demand.yaml")
    assert plan.on_demand()
    assert codes(plan, Facts(workers_up={w.name: False for w in plan.workers})) == {}


def test_a_queue_over_the_threshold_and_a_certificate_near_expiry() -> None:
    plan = plan_of("homelab.yaml")
    t = plan.fleet.observability.thresholds
    model = plan.fleet.models[0].name
    assert codes(plan, Facts(queues={model: t.queue_depth})) == {}
    assert codes(plan, Facts(queues={model: t.queue_depth + 1})) == {"FleetModelQueueGrowing": [{"model": model}]}
    now = 1_000_000.0
    soon = Facts(cert_expiry=now + (t.cert_expiry_days - 1) * 86400, now=now)
    later = Facts(cert_expiry=now + (t.cert_expiry_days + 1) * 86400, now=now)
    if plan.fleet.gateway.tls.mode == "internal":  # Caddy's own 12-hour certificates: an hour left is the alarm
        soon, later = Facts(cert_expiry=now + 1800, now=now), Facts(cert_expiry=now + 7200, now=now)
    (cert,) = evaluate(plan, soon)
    assert cert.code == "FleetTlsCertificateExpiring" and cert.subject == {"domain": plan.fleet.gateway.public_name}
    assert not evaluate(plan, later)


def test_an_agent_that_does_not_answer_and_nvml_down_only_where_the_spec_has_gpus() -> None:
    plan = plan_of("homelab.yaml")
    gpu_host = next(h.name for h in plan.fleet.hosts or [] if h.gpus)
    down: dict[str, Any] = {
        "host": gpu_host,
        "nvml": {"up": False, "reason": "driver gone"},
        "gpus": None,
        "workers": [],
    }
    assert codes(plan, Facts(agents={gpu_host: down})) == {"FleetAgentNvmlDown": [{"host": gpu_host}]}
    assert codes(plan, Facts(agents={gpu_host: None})) == {"FleetAgentDown": [{"host": gpu_host}]}
    cpu_only = plan_of("workstation.yaml")
    hosts = [h for h in cpu_only.fleet.hosts or [] if not h.gpus]
    for h in hosts:
        doc: dict[str, Any] = {
            "host": h.name,
            "nvml": {"up": False, "reason": "no driver"},
            "gpus": None,
            "workers": [],
        }
        assert "FleetAgentNvmlDown" not in codes(cpu_only, Facts(agents={h.name: doc}))


def test_the_console_reads_cards_and_agents_into_facts() -> None:
    plan = plan_of("homelab.yaml")
    a, b = plan.workers[0], plan.workers[1]
    doc = {
        "time": 1_000_000.0,
        "workers": [
            {"name": a.name, "model": a.model, "health": "down", "in_flight": 3, "queued": 2},
            {"name": b.name, "model": b.model, "health": "idle", "in_flight": None, "queued": None},
        ],
        "agents": {a.host: None},
    }
    facts = console_facts(doc, cert_expiry=None)
    assert facts.workers_up == {a.name: False}  # idle (an on-demand worker unloaded on purpose) is not down
    assert facts.queues == {a.model: 5}
    assert facts.agents == {a.host: None} and facts.now == 1_000_000.0
    shown = console_warnings()(plan, doc)
    assert {w["code"] for w in shown} >= {"FleetWorkerDown", "FleetAgentDown"}
    assert all({"code", "severity", "subject", "message", "evidence", "runbook"} <= set(w) for w in shown)
