"""Prometheus on the gateway host: `<gateway>/prometheus/{prometheus.yml, rules.yml, RUNBOOK.md}`.

Built as data and dumped with stable key order. Prometheus listens on
loopback and scrapes, over the mesh:

- Envoy's admin `/stats/prometheus` and the gatekeeper's `/metrics` (loopback);
- every worker whose backend exports metrics (vLLM, llama.cpp; Ollama has
  none), at its mesh address, labelled `worker`, `model`, `host`, `backend`;
- the agent of every host with GPUs (the hosts that run one), labelled `host`;
  the agent's own labels win (`honor_labels`), it is the fleet's program.

Rules are in ``controller.render.rules``; the runbook is
``monitoring/RUNBOOK.md``, copied beside them so every alert's `runbook`
annotation points at a file on the same host.
"""

from __future__ import annotations

from typing import Any

from controller import backends
from controller.plan.models import Plan
from controller.render import Files, asset, dump_yaml, renderer
from controller.render.rules import rules

HEADER = "# Rendered by `controller render` from the fleet spec; do not edit.\n"
SCRAPE_INTERVAL = "15s"


def has_agent(plan: Plan, host: str) -> bool:
    """A host runs an agent when it has GPUs or workers (CPU workers: health and stray GPU use)."""
    return bool(plan.host(host).gpus or plan.workers_on(host))


# The worker secret on the gateway host, as the Prometheus container sees it (mounted from the host's secrets).
WORKER_KEY_FILE = "/run/secrets/worker_key"


@renderer("prometheus")
def render(plan: Plan) -> Files:
    folder = f"{plan.fleet.gateway.host}/prometheus"
    return {
        f"{folder}/prometheus.yml": HEADER + dump(config(plan)),
        f"{folder}/rules.yml": HEADER + dump(rules(plan)),
        f"{folder}/RUNBOOK.md": asset("monitoring", "RUNBOOK.md").read_text(encoding="utf-8"),
    }


def dump(doc: dict[str, Any]) -> str:
    return dump_yaml(doc)


def target(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def config(plan: Plan, worker_key_file: str = WORKER_KEY_FILE) -> dict[str, Any]:
    """Prometheus's config; ``worker_key_file`` holds the worker secret (workers answer no one without it)."""
    gw = plan.fleet.gateway
    jobs = [
        _job("prometheus", [{"targets": [target("127.0.0.1", plan.fleet.gateway.ports.prometheus)]}]),
        _job("alertmanager", [{"targets": [target("127.0.0.1", plan.fleet.gateway.ports.alertmanager)]}]),
        _job("envoy", [{"targets": [target("127.0.0.1", gw.ports.envoy_admin)]}], metrics_path="/stats/prometheus"),
        _job("gatekeeper", [{"targets": [target("127.0.0.1", gw.ports.gatekeeper)]}]),
        {**_job("workers", _workers(plan)), "authorization": {"type": "Bearer", "credentials_file": worker_key_file}},
        _job(
            "agents",
            [
                {"targets": [target(str(h.address), h.agent_port)], "labels": {"host": h.name}}
                for h in plan.fleet.hosts or []
                if has_agent(plan, h.name)
            ],
            honor_labels=True,
        ),
    ]
    return {
        "global": {
            "scrape_interval": SCRAPE_INTERVAL,
            "scrape_timeout": "10s",
            "evaluation_interval": SCRAPE_INTERVAL,
            "external_labels": {"fleet": plan.fleet.name},
        },
        # Relative to this file: /etc/prometheus/rules.yml in the container.
        "rule_files": ["rules.yml"],
        "alerting": {
            "alertmanagers": [
                {"static_configs": [{"targets": [target("127.0.0.1", plan.fleet.gateway.ports.alertmanager)]}]}
            ]
        },
        "scrape_configs": [job for job in jobs if job["static_configs"]],
    }


def _job(
    name: str, static: list[dict[str, Any]], *, metrics_path: str = "/metrics", honor_labels: bool = False
) -> dict[str, Any]:
    job: dict[str, Any] = {"job_name": name, "metrics_path": metrics_path}
    if honor_labels:
        job["honor_labels"] = True
    job["static_configs"] = static
    return job


def _workers(plan: Plan) -> list[dict[str, Any]]:
    out = []
    for w in plan.workers:
        path = backends.get(w.backend).metrics_path
        if not path:
            continue  # Ollama exports no Prometheus metrics; Envoy's health checks still watch it
        labels = {"worker": w.name, "model": w.model, "host": w.host, "backend": w.backend}
        if path != "/metrics":
            labels["__metrics_path__"] = path
        out.append({"targets": [target(w.address, w.port)], "labels": labels})
    return out
