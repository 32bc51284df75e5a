"""The planner: pure ``make_plan(spec) -> Plan``.

Phases: placement (VRAM estimate and bin-packing) → naming → ports. Nothing
here touches files, processes or the network.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from controller.errors import PlanError, Problem
from controller.gcpause import collector_paused
from controller.plan.models import GpuUse, Plan, Worker
from controller.plan.placement import Placed, place
from controller.spec.load import LoadedSpec
from controller.spec.models import Fleet

ProblemAt = Callable[[tuple[str | int, ...], str], Problem]


@collector_paused()
def make_plan(spec: LoadedSpec) -> Plan:
    return plan_fleet(spec.fleet, spec.locations.problem)


def plan_fleet(fleet: Fleet, problem: ProblemAt) -> Plan:
    placed, gpu_uses = place(fleet, problem)
    named = _name(placed)
    ports = _ports(fleet, named, problem)
    workers = []
    hosts = {h.name: h for h in fleet.hosts or []}
    counter: dict[str, int] = {}
    for name, p in named:
        counter[p.model.name] = counter.get(p.model.name, 0) + 1
        workers.append(
            Worker(
                name=name,
                model=p.model.name,
                served_names=p.model.served_names,
                replica=counter[p.model.name],
                backend=p.model.backend,
                device=p.model.device,
                host=p.host,
                address=str(hosts[p.host].address),
                port=ports[name],
                gpus=p.gpus,
                estimate=p.estimate,
                settings=dict(p.settings),
            )
        )
    by_gpu: dict[str, list[str]] = {}
    for w in workers:
        for g in w.gpus:
            by_gpu.setdefault(g.uuid, []).append(w.name)
    gpus = [u.model_copy(update={"workers": by_gpu.get(u.gpu.uuid, [])}) for u in gpu_uses]
    return Plan(fleet=fleet, workers=workers, gpus=gpus)


def slug(text: str) -> str:
    """A container- and DNS-safe form of a served name: `Qwen/Qwen2.5-7B` → `qwen-qwen2-5-7b`."""
    out = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return out[:40].strip("-") or "model"


def _name(placed: list[Placed]) -> list[tuple[str, Placed]]:
    """Deterministic worker names per (model, host, GPUs), sorted by host order then name."""
    out = []
    for p in placed:
        where = "gpu" + "-".join(str(g.index) for g in p.gpus) if p.gpus else "cpu"
        name = f"{slug(p.model.name)}-{p.host}-{where}"
        if p.slot > 1 or not p.gpus:
            name += f"-{p.slot}"
        out.append((name, p))
    out.sort(key=lambda x: (x[1].host, x[0]))
    return out


def _ports(fleet: Fleet, named: list[tuple[str, Placed]], problem: ProblemAt) -> dict[str, int]:
    """Each host's fixed ports must not collide; workers take the next free port from the base."""
    problems: list[Problem] = []
    fixed: dict[str, dict[int, tuple[tuple[str | int, ...], str]]] = {}
    for hi, host in enumerate(fleet.hosts or []):
        claims: list[tuple[int, tuple[str | int, ...], str]] = [
            (host.agent_port, ("hosts", hi, "agent_port"), "the host agent")
        ]
        if host.name == fleet.gateway.host:
            for key, port in fleet.gateway.ports.model_dump().items():
                claims.append((port, ("gateway", "ports", key), f"gateway {key}"))
        taken: dict[int, tuple[tuple[str | int, ...], str]] = {}
        for port, path, who in claims:
            if port in taken:
                problems.append(
                    problem(
                        path,
                        f"host {host.name}: port {port} for {who} is already taken by {taken[port][1]}; pick another",
                    )
                )
            else:
                taken[port] = (path, who)
        fixed[host.name] = taken
    if problems:
        raise PlanError("port collision", problems)
    ports: dict[str, int] = {}
    hosts = {h.name: (i, h) for i, h in enumerate(fleet.hosts or [])}
    next_port = {name: h.worker_port_base for name, (_, h) in hosts.items()}
    for name, p in named:
        port = next_port[p.host]
        while port in fixed[p.host]:
            port += 1
        if port > 65535:
            hi, _ = hosts[p.host]
            raise PlanError(
                "ports exhausted",
                [
                    problem(
                        ("hosts", hi, "worker_port_base"),
                        f"host {p.host}: worker ports run past 65535; lower worker_port_base",
                    )
                ],
            )
        ports[name] = port
        next_port[p.host] = port + 1
    return ports


__all__ = ["GpuUse", "Plan", "Worker", "make_plan", "plan_fleet", "slug"]
