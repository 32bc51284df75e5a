"""`controller status SPEC`: a deployed fleet's state, from one read-only playbook run on every host at once.

`fleet_status` runs ``ansible/status.yml`` (``ansible/files/status_probe.py`` on each host); ``report`` turns what
the hosts said into a ``Report`` and is pure, so it is tested with made-up probe documents.

What is checked, per host: reachable over SSH; the deployed version (the sha256 of the resolved spec the last
deploy pushed, ``/etc/fleet/spec/fleet.yaml`` in its manifest) against the spec's current one; the fleet's containers
running; on hosts with an agent, its ``/status`` fetched on the host itself: each worker's health, health-check
latency and GPU pinning. Per ordered host pair (mesh kinds other than `none`): from the first host, a TCP connect to
the second's mesh address on a port it serves there (its agent's, or the gateway's HTTPS port where Envoy listens
on every address), and with WireGuard the peer's latest handshake (the probe first sends the peer a datagram, so
a live peer has a fresh one). A pair with a TCP check is judged by it; one without (WireGuard only) by a handshake
within ``HANDSHAKE_FRESH_S``, so a peer that died in the last few minutes may still look ok there.

Problems (exit 1): a host unreachable or its probe failing; not deployed, another fleet's, or an older spec;
a container not running or missing; an agent not answering; a worker down or missing; pinning ``wrong_gpu`` or
``not_found``; a mesh pair down. Pinning ``unknown`` (NVML could not tell, e.g. no NVML on the host) is shown as
such and noted, never counted as a failure.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.deploy import bundle
from controller.deploy.ansible import Connection, HostResult, run_playbook, script_doc
from controller.mesh import wireguard
from controller.plan.models import Plan
from controller.render.containers import SPEC_PATH
from controller.spec import LoadedSpec
from controller.warnings import Facts, evaluate

PLAYBOOK = "status.yml"
TASK = "status"  # the playbook's one task
HANDSHAKE_FRESH_S = 180  # WireGuard's REJECT_AFTER_TIME: a session older than this carries nothing
CHECK_TIMEOUT_S = 3.0  # each TCP connect and the agent fetch, on the host
PLAYBOOK_TIMEOUT_S = 180
EXIT_OK = 0
EXIT_PROBLEMS = 1
PAIR_OK, PAIR_NO_HANDSHAKE, PAIR_UNREACHABLE, PAIR_UNKNOWN = "ok", "no handshake", "unreachable", "unknown"


def current_version(loaded: LoadedSpec) -> str:
    """The sha256 of the resolved spec, as a deploy of ``loaded`` would push it to ``/etc/fleet/spec/fleet.yaml``."""
    return hashlib.sha256(bundle.resolved_spec(loaded).encode()).hexdigest()


def has_agent(plan: Plan, host: str) -> bool:
    return bool(plan.host(host).gpus or plan.workers_on(host))  # as controller/render/containers.py places it


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def agent_url(plan: Plan, host: str) -> str | None:
    h = plan.host(host)
    return f"http://{_url_host(str(h.address))}:{h.agent_port}/status" if has_agent(plan, host) else None


def mesh_port(plan: Plan, host: str) -> tuple[int | None, str]:
    """The port peers connect to on ``host``'s mesh address, and what serves it; ``(None, why not)`` if none."""
    h = plan.host(host)
    if has_agent(plan, host):
        return h.agent_port, "agent"
    gw = plan.fleet.gateway
    if host == gw.host and (gw.bind is None or str(gw.bind) == str(h.address)):
        return gw.ports.https, "gateway HTTPS"
    return None, "nothing listens on its mesh address"


def mesh_interface(plan: Plan) -> str | None:
    return plan.fleet.mesh.interface if plan.fleet.mesh.kind == "wireguard" else None


def probe_args(plan: Plan, host: str) -> dict[str, Any]:
    """The status probe's argument for ``host`` (ansible/files/status_probe.py)."""
    peers = []
    if plan.fleet.mesh.kind != "none":
        for other in plan.fleet.hosts or []:
            if other.name != host:
                port, _ = mesh_port(plan, other.name)
                peers.append({"name": other.name, "address": str(other.address), "port": port})
    return {
        "fleet": plan.fleet.name,
        "manifest": bundle.MANIFEST,
        "engine": None,
        "interface": mesh_interface(plan),
        "agent": agent_url(plan, host),
        "peers": peers,
        "timeout_s": CHECK_TIMEOUT_S,
    }


def state_public_keys(state_dir: Path, plan: Plan) -> dict[str, str]:
    """The hosts' WireGuard public keys the controller keeps (read only: none is made here)."""
    out = {}
    for h in plan.fleet.hosts or []:
        path = wireguard.public_key_file(state_dir, plan.fleet.name, h.name)
        try:
            out[h.name] = path.read_text().strip()
        except OSError:
            continue
    return out


# -- what the hosts said ----------------------------------------------------------


@dataclass(frozen=True)
class HostProbe:
    reachable: bool  # over SSH
    doc: dict[str, Any] | None  # the probe's document; None when it did not run or printed no JSON
    error: str = ""  # why there is no document


def from_results(results: dict[str, HostResult]) -> dict[str, HostProbe]:
    out = {}
    for host, r in results.items():
        if r.unreachable:
            out[host] = HostProbe(False, None, r.message or "unreachable")
            continue
        if not r.ok:
            out[host] = HostProbe(True, None, f"the status probe failed: {r.message}")
            continue
        try:
            doc = script_doc(str(r.results.get(TASK, {}).get("stdout", "")), "the status probe")
        except ValueError as exc:
            out[host] = HostProbe(True, None, str(exc))
            continue
        out[host] = HostProbe(True, doc, "")
    return out


# -- the report -------------------------------------------------------------------


@dataclass
class Report:
    fleet: str
    spec: str
    version: str  # the spec's current version (sha256 of the resolved spec)
    mesh_kind: str
    mesh_method: str
    hosts: list[dict[str, Any]] = field(default_factory=list)
    mesh: list[dict[str, Any]] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)  # the warnings engine's (controller/warnings.py)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_PROBLEMS if self.problems else EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "spec": self.spec,
            "spec_sha256": self.version,
            "ok": not self.problems,
            "exit_code": self.exit_code,
            "seconds": round(self.seconds, 2),
            "hosts": self.hosts,
            "mesh": {"kind": self.mesh_kind, "method": self.mesh_method, "pairs": self.mesh},
            "workers": self.workers,
            "problems": self.problems,
            "notes": self.notes,
            "warnings": self.warnings,
        }


def mesh_method(plan: Plan) -> str:
    kind = plan.fleet.mesh.kind
    if kind == "none":
        return "no mesh (kind none): not checked"
    parts = []
    for h in plan.fleet.hosts or []:
        port, what = mesh_port(plan, h.name)
        parts.append(f"{h.name}: {what} port {port}" if port else f"{h.name}: {what}")
    how = "TCP connect from each host to each peer's mesh address (" + ", ".join(parts) + ")"
    if kind == "wireguard":
        how += f"; WireGuard latest handshake per peer (`wg show {plan.fleet.mesh.interface} dump`), which alone "
        how += f"judges a peer with no TCP port (fresh: within {HANDSHAKE_FRESH_S} s)"
    return how


def report(
    plan: Plan,
    spec: str,
    version: str,
    probes: dict[str, HostProbe],
    public_keys: dict[str, str] | None = None,
) -> Report:
    """The fleet's status from each host's probe (``probes``: every host of the plan that was asked)."""
    fleet = plan.fleet
    rep = Report(fleet.name, spec, version, fleet.mesh.kind, mesh_method(plan))
    names = [h.name for h in fleet.hosts or [] if h.name in probes]
    keys = dict(public_keys or {})
    for name in names:
        doc = probes[name].doc or {}
        own = (doc.get("wireguard") or {}).get("public_key")
        if own and name not in keys:
            keys[name] = own
    unknown_pinning: dict[str, list[str]] = {}
    for name in names:
        host_row, workers = _host(plan, name, version, probes[name], rep.problems, unknown_pinning)
        rep.hosts.append(host_row)
        rep.workers += workers
    for host, reasons in unknown_pinning.items():
        why = "; ".join(sorted(set(reasons)))
        rep.notes.append(
            f"{host}: GPU pinning unknown for {len(reasons)} worker(s): {why}; not counted as a failure "
            "(NVML could not tell which GPU a worker uses)"
        )
    agents: dict[str, dict[str, Any] | None] = {}
    for name in names:
        if agent_url(plan, name) is not None:
            agent = (probes[name].doc or {}).get("agent")
            ok = isinstance(agent, dict) and agent.get("ok") and isinstance(agent.get("status"), dict)
            agents[name] = agent["status"] if ok and isinstance(agent, dict) else None
    rep.warnings = [w.as_dict() for w in evaluate(plan, Facts(agents=agents))]
    if fleet.mesh.kind != "none":
        for src in names:
            for dst in names:
                if src != dst:
                    pair = _pair(plan, src, dst, probes[src], keys.get(dst))
                    rep.mesh.append(pair)
                    if pair["verdict"] in (PAIR_UNREACHABLE, PAIR_NO_HANDSHAKE):
                        rep.problems.append(f"mesh {src} -> {dst}: {pair['verdict']} ({pair['detail']})")
    return rep


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "-"


def _host(
    plan: Plan,
    name: str,
    version: str,
    probe: HostProbe,
    problems: list[str],
    unknown_pinning: dict[str, list[str]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    host = plan.host(name)
    planned = plan.workers_on(name)
    row: dict[str, Any] = {
        "name": name,
        "ssh_target": host.ssh or "local",
        "ssh": "ok" if probe.reachable else "unreachable",
        "error": probe.error or None,
        "deployed": None,
        "containers": None,
        "agent": None,
    }
    worker_rows: list[dict[str, Any]] = [
        {
            "host": name,
            "worker": w.name,
            "model": w.model,
            "gpus": [{"index": g.index, "uuid": g.uuid} for g in w.gpus],
            "health": "unknown",
            "latency_ms": None,
            "health_error": None,
            "pinning": "unknown",
            "pinning_reason": "",
            "agent_gpus": None,
            "deployed_spec_sha256": None,
            "current": None,
            "memory_warning": None,
        }
        for w in planned
    ]
    if not probe.reachable:
        problems.append(
            f"{name}: unreachable over SSH ({row['ssh_target']}): {probe.error}; check that the host is up "
            "and that ssh reaches it with the key and ssh_config given"
        )
        for w in worker_rows:
            w["pinning_reason"] = w["health_error"] = "host unreachable"
        return row, worker_rows
    if probe.doc is None:
        problems.append(f"{name}: {probe.error}")
        for w in worker_rows:
            w["pinning_reason"] = w["health_error"] = "no probe result"
        return row, worker_rows
    doc = probe.doc
    row["ssh"] = "ok"
    # the deployed version
    manifest = doc.get("manifest")
    deployed_sha: str | None = None
    if doc.get("manifest_error"):
        problems.append(f"{name}: the deploy manifest is unreadable ({doc['manifest_error']}); redeploy the host")
    elif not isinstance(manifest, dict):
        problems.append(f"{name}: not deployed (no {bundle.MANIFEST}); run `controller deploy SPEC`")
    else:
        files = manifest.get("files") or {}
        deployed_sha = files.get(SPEC_PATH)
        row["deployed"] = {
            "spec_sha256": deployed_sha,
            "current": deployed_sha == version,
            "fleet": manifest.get("fleet"),
            "deployed_at": manifest.get("deployed_at"),
            "by": manifest.get("by"),
        }
        if manifest.get("fleet") not in (None, plan.fleet.name):
            problems.append(
                f"{name}: holds fleet {manifest.get('fleet')!r}, not {plan.fleet.name!r}; check the spec's hosts"
            )
        elif deployed_sha != version:
            problems.append(
                f"{name}: runs spec {_short(deployed_sha)} (deployed {manifest.get('deployed_at', '?')} by "
                f"{manifest.get('by', '?')}), not the current {_short(version)}; run `controller deploy SPEC`"
            )
    for w in worker_rows:
        w["deployed_spec_sha256"] = deployed_sha
        w["current"] = deployed_sha == version if deployed_sha else None
    # containers
    if doc.get("engine_error"):
        problems.append(f"{name}: cannot list containers: {doc['engine_error']}")
    listed = {str(c.get("name")): c for c in doc.get("containers") or []}
    expected = sorted(f"fleet-{s}" for s in ((manifest or {}).get("services") or {})) if manifest else []
    names = sorted(set(listed) | set(expected))
    running = [n for n in names if listed.get(n, {}).get("state") == "running"]
    missing = [n for n in expected if n not in listed]
    stopped = {n: str(listed[n].get("state") or "?") for n in names if n in listed and n not in running}
    row["containers"] = {
        "running": len(running),
        "total": len(names),
        "not_running": stopped,
        "missing": missing,
        "list": [{"name": n, "state": listed[n].get("state") if n in listed else "missing"} for n in names],
    }
    if not doc.get("engine_error"):
        for n, state in stopped.items():
            problems.append(f"{name}: container {n} is {state}; see `{doc.get('engine', 'podman')} logs {n}` there")
        for n in missing:
            problems.append(f"{name}: container {n} (deployed) does not exist; run `controller deploy SPEC`")
    # the agent: workers' health and pinning
    agent = doc.get("agent")
    if agent_url(plan, name) is not None:
        if not isinstance(agent, dict) or not agent.get("ok"):
            err = (agent or {}).get("error", "not asked")
            url = (agent or {}).get("url", agent_url(plan, name))
            row["agent"] = {"url": url, "ok": False, "error": err}
            problems.append(f"{name}: agent at {url} did not answer ({err}); its workers' health is unknown")
            for w in worker_rows:
                w["pinning_reason"] = w["health_error"] = "agent did not answer"
        else:
            _workers(name, agent, row, worker_rows, problems, unknown_pinning)
    return row, worker_rows


def _workers(
    host: str,
    agent: dict[str, Any],
    row: dict[str, Any],
    worker_rows: list[dict[str, Any]],
    problems: list[str],
    unknown_pinning: dict[str, list[str]],
) -> None:
    status = agent.get("status") or {}
    nvml = status.get("nvml") or {}
    row["agent"] = {
        "url": agent.get("url"),
        "ok": True,
        "seconds": agent.get("seconds"),
        "nvml": {"up": bool(nvml.get("up")), "reason": nvml.get("reason"), "errors": nvml.get("errors") or []},
        "gpus": [{"index": g.get("index"), "uuid": g.get("uuid")} for g in status.get("gpus") or []],
        "missing_gpus": status.get("missing_gpus") or [],
    }
    seen = {str(w.get("name")): w for w in status.get("workers") or []}
    for w in worker_rows:
        found = seen.get(w["worker"])
        if found is None:
            w["health"], w["health_error"] = "missing", "the agent does not know this worker"
            w["pinning_reason"] = "the agent does not know this worker"
            problems.append(
                f"{host}: worker {w['worker']} is not among the agent's workers (the deployed spec differs?); "
                "run `controller deploy SPEC`"
            )
            continue
        health = found.get("health") or {}
        w["health"] = "up" if health.get("up") else "down"
        latency = health.get("latency_seconds")
        w["latency_ms"] = round(latency * 1000, 1) if isinstance(latency, int | float) else None
        w["health_error"] = health.get("error")
        w["pinning"] = str(found.get("pinning") or "unknown")
        w["pinning_reason"] = str(found.get("pinning_reason") or "")
        w["agent_gpus"] = list(found.get("gpus") or [])
        w["memory_warning"] = found.get("memory_warning")  # its memory far from the estimate (controller/agent)
        planned = sorted(g["uuid"] for g in w["gpus"])
        if sorted(w["agent_gpus"]) != planned:
            problems.append(
                f"{host}: worker {w['worker']} is deployed on GPU(s) {', '.join(sorted(w['agent_gpus'])) or 'none'}, "
                f"planned {', '.join(planned) or 'none'}; run `controller deploy SPEC`"
            )
        if w["health"] != "up":
            problems.append(
                f"{host}: worker {w['worker']} is down ({w['health_error'] or 'no answer'} at {health.get('url')})"
            )
        if w["pinning"] in ("wrong_gpu", "not_found"):
            problems.append(f"{host}: worker {w['worker']} GPU pinning {w['pinning']}: {w['pinning_reason']}")
        elif w["pinning"] != "ok":
            unknown_pinning.setdefault(host, []).append(w["pinning_reason"] or "no reason given")


def _pair(plan: Plan, src: str, dst: str, probe: HostProbe, dst_key: str | None) -> dict[str, Any]:
    pair: dict[str, Any] = {"from": src, "to": dst, "verdict": PAIR_UNKNOWN, "detail": "", "tcp": None}
    if probe.doc is None:
        pair["detail"] = f"{src} was not probed"
        return pair
    doc = probe.doc
    tcp = (doc.get("tcp") or {}).get(dst)
    pair["tcp"] = tcp
    details = []
    verdict: str | None = None
    if isinstance(tcp, dict):
        where = f"TCP {tcp.get('address')}:{tcp.get('port')}"
        if tcp.get("ok"):
            verdict = PAIR_OK
            details.append(f"{where} in {float(tcp.get('seconds') or 0) * 1000:.0f} ms")
        else:
            verdict = PAIR_UNREACHABLE
            details.append(f"{where}: {tcp.get('error')}")
    iface = mesh_interface(plan)
    if iface is not None:
        wg = doc.get("wireguard") or {}
        peer = (wg.get("peers") or {}).get(dst_key) if dst_key else None
        age: float | None = None
        if peer is not None and int(peer.get("latest_handshake") or 0) > 0:
            age = max(0.0, float(doc.get("now") or time.time()) - int(peer["latest_handshake"]))
        pair["handshake_age_s"] = None if age is None else round(age)
        pair["endpoint"] = (peer or {}).get("endpoint")
        if not wg.get("up"):
            verdict = PAIR_UNREACHABLE
            details.insert(0, f"{iface} is down on {src}" + (f": {wg['error']}" if wg.get("error") else ""))
        elif wg.get("error"):
            details.append(str(wg["error"]))
        elif not dst_key:
            details.append(f"handshake not read: no public key for {dst}")
        elif peer is None:
            details.append(f"{dst} is not a peer of {iface} on {src}")
            verdict = verdict or PAIR_NO_HANDSHAKE
        else:
            details.append("never a handshake" if age is None else f"handshake {age:.0f} s ago")
            if verdict is None:
                verdict = PAIR_OK if age is not None and age <= HANDSHAKE_FRESH_S else PAIR_NO_HANDSHAKE
    if verdict is None:
        verdict = PAIR_UNKNOWN
        details.append("not checked: " + mesh_port(plan, dst)[1])
    pair["verdict"], pair["detail"] = verdict, "; ".join(details)
    return pair


# -- running it -------------------------------------------------------------------


def fleet_status(loaded: LoadedSpec, plan: Plan, state_dir: Path, conn: Connection) -> Report:
    """Probe every host of the plan at once (one playbook run) and report."""
    began = time.monotonic()
    hosts = [h.name for h in plan.fleet.hosts or []]
    host_vars = {
        h: {"fleet_status_args": base64.b64encode(json.dumps(probe_args(plan, h)).encode()).decode()} for h in hosts
    }
    results = run_playbook(PLAYBOOK, plan.fleet, hosts, conn, {}, host_vars, timeout_s=PLAYBOOK_TIMEOUT_S)
    probes = from_results({h: results[h] for h in hosts})
    rep = report(plan, str(loaded.path), current_version(loaded), probes, state_public_keys(state_dir, plan))
    rep.seconds = time.monotonic() - began
    return rep
