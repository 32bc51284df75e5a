"""Operate a local stack: up (idempotent), down, status, and control of one process."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from controller.atomic import write_file
from controller.errors import ControllerError
from controller.gateway.certs import ensure_sds_file, served_certificate, wait_published
from controller.local import limits
from controller.local.configs import stack_files
from controller.local.processes import ProcessSpec, local_processes
from controller.local.state import StateDir, is_same_process, start_time
from controller.plan import Plan, make_plan
from controller.render import envoy
from controller.secrets import ensure_worker_secret
from controller.spec import load_spec


@dataclass(frozen=True)
class StackInfo:
    base_url: str
    ca_cert: Path
    spec: Path
    state_dir: Path
    already_running: bool
    prometheus_url: str | None = None
    # A running stack brought to a changed spec (`reload`): the processes restarted, started and stopped.
    restarted: tuple[str, ...] = ()
    started: tuple[str, ...] = ()
    stopped: tuple[str, ...] = ()


def spec_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def supervisor_pid(state: StateDir) -> int | None:
    info = state.read_json(state.supervisor)
    if info and is_same_process(info.get("pid"), info.get("started")):
        return int(info["pid"])
    return None


def gateway_url(plan: Plan) -> str:
    gw = plan.fleet.gateway
    port = "" if gw.ports.https == 443 else f":{gw.ports.https}"
    return f"https://{gw.public_name}{port}"


def base_url(plan: Plan) -> str:
    return f"{gateway_url(plan)}/v1"


def console_url(plan: Plan) -> str:
    return f"{gateway_url(plan)}/console"


def up(spec_path: Path, state: StateDir, wait_s: float, progress: Callable[[dict[str, Any]], None]) -> StackInfo:
    spec_path = spec_path.resolve()
    plan = make_plan(load_spec(spec_path))
    hosts = plan.fleet.hosts or []
    if len(hosts) != 1:
        raise ControllerError(f"controller up runs a single-host fleet; {spec_path} has {len(hosts)} hosts")
    state.create()
    stack = state.read_json(state.root / "stack.json") or {}
    pid = supervisor_pid(state)
    if pid is not None:
        if stack.get("spec") == str(spec_path) and stack.get("spec_hash") == spec_hash(spec_path):
            wait_healthy(state, wait_s, progress)
            wait_serving(plan, state, wait_s)
            return StackInfo(base_url(plan), state.ca_cert, spec_path, state.root, True, prometheus_url(plan, state))
        if stack.get("spec") != str(spec_path):
            raise ControllerError(
                f"a stack for {stack.get('spec')} is running in {state.root} (supervisor pid {pid}); run "
                "`controller down` first or use another --state-dir"
            )
        return reload(plan, spec_path, state, wait_s, progress)
    specs = local_processes(plan, spec_path, state)
    check_ports(specs, state)
    limits.check_inotify(plan)
    write_configs(plan, state)
    write_stack(plan, spec_path, state)
    spawn_supervisor(spec_path, state)
    wait_healthy(state, wait_s, progress)
    wait_serving(plan, state, wait_s)
    return StackInfo(base_url(plan), state.ca_cert, spec_path, state.root, False, prometheus_url(plan, state))


def write_stack(plan: Plan, spec_path: Path, state: StateDir) -> None:
    record = {
        "spec": str(spec_path),
        "spec_hash": spec_hash(spec_path),
        "base_url": base_url(plan),
        "ca_cert": str(state.ca_cert),
    }
    write_file(state.root / "stack.json", json.dumps(record, indent=2) + "\n")


def reload(
    plan: Plan, spec_path: Path, state: StateDir, wait_s: float, progress: Callable[[dict[str, Any]], None]
) -> StackInfo:
    """The running stack to its changed spec, restarting only the processes the change touches.

    Envoy keeps running: its listeners, clusters and endpoints are files it watches (a new model, user limit
    or worker reaches it by a rename). A worker that changes or goes is first taken out of rotation (DRAINING
    in its models' endpoints) and its requests, streams included, finish (bounded by DRAIN_S); then the
    supervisor hands over to a new one, which adopts every process whose fingerprint (command, environment,
    the digest of what it reads at start) is unchanged and restarts the others; a restarted worker is put back
    once healthy.
    """
    specs = local_processes(plan, spec_path, state)
    fingerprints = {s.name: s.fingerprint for s in specs}
    table = (state.read_json(state.table) or {}).get("processes") or {}
    changed = sorted(n for n, row in table.items() if row.get("fingerprint") != fingerprints.get(n))
    added = sorted(set(fingerprints) - set(table))
    going = {n for n, row in table.items() if n in changed and row.get("kind") == "worker"}
    # Before anything is drained: a running Envoy that cannot watch the new endpoint files would not route them.
    limits.check_inotify(plan, watched=[p.name for p in (state.config / envoy.EDS_FOLDER).glob("*.yaml")])
    drain(state, going, DRAIN_S)
    check_ports([s for s in specs if s.name in changed or s.name in added], state)
    staying = frozenset(going & set(fingerprints))
    write_configs(plan, state, draining=staying)  # a replaced worker gets requests again once it is healthy
    write_stack(plan, spec_path, state)
    hand_over(state)
    spawn_supervisor(spec_path, state)
    wait_healthy(state, wait_s, progress)
    if staying:
        write_configs(plan, state)
    wait_serving(plan, state, wait_s)
    return StackInfo(
        base_url(plan),
        state.ca_cert,
        spec_path,
        state.root,
        False,
        prometheus_url(plan, state),
        restarted=tuple(n for n in changed if n in fingerprints),
        started=tuple(added),
        stopped=tuple(n for n in changed if n not in fingerprints),
    )


DRAIN_S = 120.0  # how long a worker that changes may take to finish its requests before it is restarted anyway


def drain(state: StateDir, workers: set[str], timeout: float) -> None:
    """Mark ``workers`` DRAINING in the endpoint files Envoy watches and wait until no request is active on them
    (Envoy's admin `/clusters`), at most ``timeout`` seconds."""
    if not workers:
        return
    folder = state.config / envoy.EDS_FOLDER
    addresses: set[tuple[str, int]] = set()
    for name in workers:
        path = folder / f"{envoy.worker_cluster(name)}.yaml"
        if path.is_file():
            for cla in yaml.safe_load(path.read_text(encoding="utf-8"))["resources"]:
                for group in cla.get("endpoints", []):
                    addresses |= {envoy.endpoint_address(e) for e in group.get("lb_endpoints", [])}
    models: list[str] = []
    for path in sorted(folder.glob(f"{envoy.MODEL_CLUSTER_PREFIX}*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        models += [cla["cluster_name"] for cla in doc["resources"]]
        envoy.set_draining(doc, addresses, True)
        write_file(path, envoy.dump(doc))
    admin = yaml.safe_load((state.config / "envoy.yaml").read_text(encoding="utf-8"))["admin"]["address"]
    url = f"http://127.0.0.1:{admin['socket_address']['port_value']}/clusters?format=json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            doc = httpx.get(url, timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return  # no Envoy to ask: nothing is routed to the workers either
        active, seen = 0, True
        for c in doc.get("cluster_statuses", []):
            if c.get("name") not in models:
                continue
            for h in c.get("host_statuses", []):
                sa = h.get("address", {}).get("socket_address", {})
                if (sa.get("address"), int(sa.get("port_value", 0))) in addresses:
                    seen &= h.get("health_status", {}).get("eds_health_status") == "DRAINING"
                    active += sum(int(s.get("value", 0)) for s in h.get("stats", []) if s.get("name") == "rq_active")
        if seen and active == 0:
            return
        time.sleep(0.2)


def hand_over(state: StateDir, timeout: float = 30) -> None:
    """Stop the supervisor, leaving its processes running (the next one adopts them)."""
    pid = supervisor_pid(state)
    if pid is None:
        return
    started = start_time(pid)
    request(state, "handover")
    deadline = time.monotonic() + timeout
    while start_time(pid) == started:
        if time.monotonic() > deadline:
            raise ControllerError(f"the supervisor (pid {pid}) did not hand over in {timeout:.0f}s")
        time.sleep(0.05)


def prometheus_url(plan: Plan, state: StateDir) -> str | None:
    table = (state.read_json(state.table) or {}).get("processes") or {}
    return f"http://127.0.0.1:{plan.fleet.gateway.ports.prometheus}" if "prometheus" in table else None


def write_configs(plan: Plan, state: StateDir, draining: frozenset[str] = frozenset()) -> None:
    """The gateway's Envoy, Caddy and monitoring configs for this stack, with paths inside its state folder, each
    written by a rename, in `stack_files`'s order; endpoint files of clusters no longer in the plan removed."""
    ensure_worker_secret(state.secrets)  # once: workers started earlier keep theirs
    ensure_sds_file(state.tls)  # Envoy starts with it empty; the gatekeeper publishes the certificate into it
    files = stack_files(plan, state, draining)
    for path, text in files.items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            write_file(path, text)
    for stale in (state.config / envoy.EDS_FOLDER).glob("*.yaml"):
        if stale not in files:
            stale.unlink()


def check_ports(specs: list[ProcessSpec], state: StateDir) -> None:
    """Refuse to start over ports another program holds (ours, to be adopted, are fine)."""
    table = (state.read_json(state.table) or {}).get("processes") or {}
    ours = {
        p
        for row in table.values()
        if is_same_process(row.get("pid"), row.get("started"))
        for p in row.get("ports") or []
    }
    for spec in specs:
        for port in spec.ports:
            if port in ours:
                continue
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    raise ControllerError(
                        f"port {port} ({spec.name}) is in use by another program; free it or change the port in the spec"
                    ) from None


def spawn_supervisor(spec_path: Path, state: StateDir) -> None:
    log = state.log("supervisor").open("ab")
    with log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controller.local.supervisor",
                "--state-dir",
                str(state.root),
                "--spec",
                str(spec_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ControllerError(f"the supervisor exited at once ({proc.returncode}); see {state.log('supervisor')}")
        if state.socket.exists() and supervisor_pid(state) == proc.pid:
            return
        time.sleep(0.05)
    raise ControllerError(f"the supervisor did not come up in 15s; see {state.log('supervisor')}")


def wait_healthy(state: StateDir, wait_s: float, progress: Callable[[dict[str, Any]], None]) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        table = state.read_json(state.table) or {}
        procs = table.get("processes") or {}
        progress(procs)
        if procs and all(p["state"] == "healthy" or p.get("held") for p in procs.values()):
            return
        if supervisor_pid(state) is None:
            raise ControllerError(f"the supervisor stopped; see {state.log('supervisor')}")
        if time.monotonic() > deadline:
            waiting = sorted(n for n, p in procs.items() if p["state"] != "healthy" and not p.get("held"))
            raise ControllerError(
                f"not healthy after {wait_s:.0f}s: {', '.join(waiting)}; see `controller logs NAME` "
                f"(the stack keeps trying; `controller down` stops it)"
            )
        time.sleep(0.2)


def wait_serving(plan: Plan, state: StateDir, wait_s: float) -> None:
    """Every process is up; now the certificate: published by the gatekeeper, and Envoy's HTTPS port serving it."""
    gw = plan.fleet.gateway
    if not wait_published(state.tls, wait_s):
        where = (
            "Caddy has not issued one (see `controller logs caddy`)"
            if gw.tls.mode != "files"
            else "check tls.cert_file"
        )
        raise ControllerError(
            f"no certificate for {gw.public_name} after {wait_s:.0f}s: {where}; `controller logs gatekeeper` says why"
        )
    address = "127.0.0.1" if gw.bind is None else str(gw.bind)
    deadline = time.monotonic() + 10
    while served_certificate(address, gw.ports.https, gw.public_name) is None:
        if time.monotonic() > deadline:
            raise ControllerError(f"Envoy's HTTPS port {gw.ports.https} does not complete a TLS handshake yet")
        time.sleep(0.1)


def request(state: StateDir, action: str, target: str | None = None, timeout: float = 30) -> dict[str, Any]:
    if supervisor_pid(state) is None:
        raise ControllerError(f"no stack is running in {state.root}; start one with `controller up`")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(str(state.socket))
            conn.sendall(json.dumps({"action": action, "target": target}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise ControllerError(f"cannot reach the supervisor at {state.socket}: {exc}") from None
    reply: dict[str, Any] = json.loads(data or b"{}")
    if not reply.get("ok"):
        raise ControllerError(str(reply.get("message") or "the supervisor refused"))
    return reply


def down(state: StateDir, timeout: float = 60) -> list[str]:
    """Stop the supervisor and every process it ran; return what was stopped."""
    stopped: list[str] = []
    pid = supervisor_pid(state)
    if pid is not None:
        started = start_time(pid)
        with contextlib.suppress(ControllerError):
            request(state, "down")
        # Wait for the process itself, not its files: it removes them just before it exits.
        deadline = time.monotonic() + timeout
        while start_time(pid) == started and time.monotonic() < deadline:
            time.sleep(0.05)
        if start_time(pid) == started:
            os.kill(pid, signal.SIGKILL)
            while start_time(pid) == started:
                time.sleep(0.05)
        stopped.append(f"supervisor (pid {pid})")
    # Whatever the table still lists as alive (a supervisor killed with -9 leaves orphans): stop it.
    table = state.read_json(state.table) or {}
    for name, row in (table.get("processes") or {}).items():
        if is_same_process(row.get("pid"), row.get("started")):
            kill_group(int(row["pid"]), row.get("started"))
            stopped.append(f"{name} (pid {row['pid']})")
    state.socket.unlink(missing_ok=True)
    state.supervisor.unlink(missing_ok=True)
    return stopped


def kill_group(pid: int, started: int | None, grace: float = 10) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and start_time(pid) == started:
        time.sleep(0.05)
    if start_time(pid) == started:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def status(state: StateDir) -> dict[str, Any]:
    stack = state.read_json(state.root / "stack.json") or {}
    table = state.read_json(state.table) or {}
    pid = supervisor_pid(state)
    procs = table.get("processes") or {}
    if pid is None:
        # Without a supervisor nothing is managed or health-checked: what the table last said is history. A process
        # still alive is an orphan (the next `controller up` adopts it); the rest are stopped, with no uptime.
        procs = {n: unsupervised(p) for n, p in procs.items()}
    return {
        "running": pid is not None,
        "supervisor_pid": pid,
        "state_dir": str(state.root),
        "spec": stack.get("spec"),
        "base_url": stack.get("base_url"),
        "ca_cert": stack.get("ca_cert"),
        "processes": procs,
    }


def unsupervised(row: dict[str, Any]) -> dict[str, Any]:
    """A process table row as it stands with no supervisor running."""
    if is_same_process(row.get("pid"), row.get("started")):
        return {**row, "state": "orphaned", "health": "unknown", "latency_ms": None}
    return {**row, "state": "stopped", "health": "down", "pid": None, "up_since": None, "latency_ms": None}
