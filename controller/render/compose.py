"""Compose: one `compose.yaml` per host whose runtime is `compose`.

Built as data and dumped with stable key order. Workers are pinned to
their GPUs by CDI device names, publish their port on the host's mesh
address only, and read secrets from files mounted by Compose.
"""

from __future__ import annotations

from typing import Any

from controller.plan.models import Plan
from controller.render import Files, dump_yaml, renderer
from controller.render.containers import Container, host_containers, host_files

HEADER = "# Rendered by `controller render` from the fleet spec; do not edit.\n"


@renderer("compose")
def render(plan: Plan) -> Files:
    out: Files = {}
    for host in plan.fleet.hosts or []:
        if host.runtime != "compose":
            continue
        containers = host_containers(plan, host.name)
        if containers:
            out[f"{host.name}/compose.yaml"] = HEADER + dump(project(plan, host.name, containers))
            out.update(host_files(plan, host.name))
    return out


def project(plan: Plan, host: str, containers: list[Container]) -> dict[str, Any]:
    services = {c.name: service(c) for c in containers}
    volumes = sorted({v.source for c in containers for v in c.volumes if not v.is_bind})
    secrets = {name: {"file": path} for c in containers for name, path, _ in c.secrets}
    doc: dict[str, Any] = {"name": f"fleet-{plan.fleet.name}-{host}", "services": services}
    if volumes:
        doc["volumes"] = {name: {"name": name} for name in volumes}
    if secrets:
        doc["secrets"] = dict(sorted(secrets.items()))
    return doc


def service(c: Container) -> dict[str, Any]:
    svc: dict[str, Any] = {"image": c.image, "container_name": c.container_name}
    if c.entrypoint:
        svc["entrypoint"] = list(c.entrypoint)
    if c.args:
        svc["command"] = list(c.args)
    if c.env:
        svc["environment"] = dict(c.env)
    if c.devices:
        svc["devices"] = list(c.devices)
    if c.host_network:
        svc["network_mode"] = "host"
    if c.network_of:
        svc["network_mode"] = f"service:{c.network_of}"
    if c.host_pid:
        svc["pid"] = "host"
    if c.ports:
        svc["ports"] = [f"{_ip(ip)}:{host_port}:{port}" for ip, host_port, port in c.ports]
    if c.volumes:
        svc["volumes"] = [f"{v.source}:{v.target}{':ro' if v.read_only else ''}" for v in c.volumes]
    if c.secrets:
        svc["secrets"] = [{"source": name, "target": target, "mode": 0o400} for name, _, target in c.secrets]
    if c.shm_size:
        svc["shm_size"] = c.shm_size
    if c.health:
        h = c.health
        svc["healthcheck"] = {
            "test": list(h.cmd),
            "interval": f"{h.interval_s}s",
            "timeout": f"{h.timeout_s}s",
            "retries": h.retries,
            "start_period": f"{h.start_period_s}s",
        }
    depends_on: dict[str, Any] = {name: {"condition": "service_healthy"} for name in c.after}
    if c.network_of:
        # Its network namespace: started first; when Compose restarts it, this one is restarted to join the new one.
        depends_on[c.network_of] = {"condition": "service_started", "restart": True}
    if depends_on:
        svc["depends_on"] = depends_on
    svc["restart"] = "unless-stopped"
    svc["stop_grace_period"] = f"{c.stop_timeout_s}s"
    svc["labels"] = dict(c.labels)
    return svc


def _ip(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def dump(doc: dict[str, Any]) -> str:
    return dump_yaml(doc)
