"""Per host: what a deploy would change, from the bundle (what should be) and the probe (what is); and the
preflight checks that must pass on every host before anything changes anywhere."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from controller.deploy.bundle import HostBundle
from controller.plan.models import Plan


@dataclass
class HostChanges:
    host: str
    files_added: list[str] = field(default_factory=list)
    files_changed: list[str] = field(default_factory=list)
    files_removed: list[str] = field(default_factory=list)  # pushed by an earlier deploy, no longer in the spec
    start: list[str] = field(default_factory=list)  # services not running now
    restart: list[str] = field(default_factory=list)  # running, with another definition or mounted file
    remove: list[str] = field(default_factory=list)  # containers of the fleet on this host no longer in the spec
    mesh: bool = False  # the WireGuard interface is created or its config applied

    @property
    def empty(self) -> bool:
        return (
            not (
                self.files_added
                or self.files_changed
                or self.files_removed
                or self.start
                or self.restart
                or self.remove
            )
            and not self.mesh
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": {"added": self.files_added, "changed": self.files_changed, "removed": self.files_removed},
            "services": {"start": self.start, "restart": self.restart, "remove": self.remove},
            "mesh": self.mesh,
            "no_change": self.empty,
        }

    def lines(self) -> list[str]:
        if self.empty:
            return ["no change"]
        out = []
        for label, items in (
            ("add", self.files_added),
            ("change", self.files_changed),
            ("remove", self.files_removed),
        ):
            out += [f"{label:7} {path}" for path in items]
        for label, items in (("start", self.start), ("restart", self.restart), ("remove", self.remove)):
            out += [f"{label:7} service {name}" for name in items]
        if self.mesh:
            out.append("apply   the WireGuard interface's config")
        return out


def changes(bundle: HostBundle, probe: dict[str, Any], mesh_interface: str | None) -> HostChanges:
    c = HostChanges(bundle.host)
    have: dict[str, str | None] = probe.get("files", {})
    for path, digest in bundle.digests.items():
        now = have.get(path)
        if now is None:
            c.files_added.append(path)
        elif now != digest:
            c.files_changed.append(path)
    manifest = probe.get("manifest") or {}
    c.files_removed = sorted(set(manifest.get("files", {})) - set(bundle.digests))
    deployed: dict[str, str] = manifest.get("services", {})
    running = {ct["name"]: ct for ct in probe.get("containers", [])}
    for name, digest in bundle.services.items():
        ct = running.get(f"fleet-{name}")
        if ct is None or ct.get("state") not in ("running", "up"):
            c.start.append(name)
        elif deployed.get(name) != digest:
            c.restart.append(name)
    # A container in another's network namespace must be recreated with it (a new namespace to join).
    for name, owner in bundle.joins.items():
        if owner in c.start + c.restart and name not in c.start + c.restart:
            c.restart.append(name)
    wanted = {f"fleet-{n}" for n in bundle.services}
    c.remove = sorted(n.removeprefix("fleet-") for n in running if n not in wanted)
    if mesh_interface is not None:
        wg = probe.get("wireguard") or {}
        c.mesh = not wg.get("up") or bool(
            {p for p in c.files_added + c.files_changed if "/wireguard/" in p or p.endswith("wireguard.key")}
        )
    return c


def preflight(plan: Plan, bundle: HostBundle, probe: dict[str, Any], compose: str | None) -> list[str]:
    """Problems that stop the whole deploy, each naming the host and what to do; empty: go."""
    host = plan.host(bundle.host)
    problems: list[str] = []
    tools = probe.get("tools", {})
    name = bundle.host
    if not bundle.services:
        return problems
    if host.runtime == "compose":
        if not (tools.get("podman") or tools.get("docker")):
            problems.append(f"{name}: no container runtime (podman or docker) is installed; install one")
        if compose and not tools.get("compose"):
            problems.append(f"{name}: the compose command {compose.split()[0]!r} is not installed on the host")
    elif not tools.get("podman"):
        problems.append(f"{name}: runtime quadlet needs podman (4.4 or newer); it is not installed")
    if probe.get("engine_error") and (tools.get("podman") or tools.get("docker")):
        problems.append(f"{name}: the container engine does not answer: {probe['engine_error']}")
    for path, what in bundle.required.items():
        if probe.get("files", {}).get(path) is None:
            problems.append(f"{name}: {what} {path} is not on the host; copy it there or use a relative path")
    cdi: dict[str, str] = probe.get("cdi_gpus", {})
    for gpu in host.gpus:
        if any(w for w in plan.workers_on(name) if any(g.uuid == gpu.uuid for g in w.gpus)) and gpu.uuid not in cdi:
            problems.append(
                f"{name}: GPU {gpu.uuid} ({gpu.name}) is planned but no CDI spec in /etc/cdi or /var/run/cdi names "
                "it; generate one with `nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml` or fix the UUID"
            )
    smi = probe.get("smi_gpus")
    if smi is not None:
        seen = {g["uuid"]: g["memory_mib"] for g in smi}
        for gpu in host.gpus:
            total = seen.get(gpu.uuid)
            if total is not None and total / 1024 < gpu.vram_gib - 0.05:
                problems.append(
                    f"{name}: GPU {gpu.uuid} has {total / 1024:.1f} GiB, the spec says vram_gib {gpu.vram_gib}; "
                    "correct vram_gib"
                )
    ours = {ct["name"] for ct in probe.get("containers", [])}
    listening = {(str(a), int(p)) for a, p in probe.get("listening", [])}
    for worker in plan.workers_on(name):
        if f"fleet-{worker.name}" in ours:
            continue  # its own port
        for addr, port in listening:
            if port == worker.port and _overlaps(addr, worker.address):
                problems.append(
                    f"{name}: port {worker.port} on {worker.address} (worker {worker.name}) is taken by a process "
                    "the fleet does not own; stop it or change the host's worker_port_base"
                )
    return problems


def _overlaps(listen: str, address: str) -> bool:
    try:
        return ipaddress.ip_address(listen).is_unspecified or listen == address
    except ValueError:
        return False
