"""The local supervisor: keeps a stack's processes running, one daemon per state folder.

Started detached by `controller up`. It starts each process in its own
session (so they outlive a crashed supervisor and can be re-adopted),
restarts crashed ones with exponential backoff, health-checks them, writes
the process table to `state.json`, and answers `status`, `restart`, `stop`,
`start`, `down` and `handover` (exit, leaving the processes running) on a
Unix socket. A new supervisor adopts the processes a previous one left running when their PID, start time and command match the
plan, so it never starts duplicates. Each process's log, and its own, is cut
back when it passes its cap (controller/local/logcap.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from controller.backends.client import WorkerClient
from controller.local import logcap
from controller.local.processes import ProcessSpec, base_env, local_processes, url_host
from controller.local.state import StateDir, is_same_process, start_time
from controller.plan import Plan, make_plan
from controller.secrets import KEY_FILE, read_worker_key
from controller.spec import Model, load_spec

TICK_S = 0.2
HEALTH_INTERVAL_S = 1.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 30.0  # a process up this long has its failure count reset
UNHEALTHY_RESTART_S = 60.0  # alive but failing health checks this long after being healthy: restart
STOP_GRACE_S = 10.0


@dataclass
class Managed:
    spec: ProcessSpec
    pid: int | None = None
    started: int | None = None  # /proc start time: the PID's identity
    popen: subprocess.Popen[bytes] | None = None
    state: str = "pending"  # pending, starting, healthy, unhealthy, backoff, stopped
    health: str = "unknown"
    latency_ms: float | None = None
    restarts: int = 0
    failures: int = 0
    last_exit: int | None = None
    up_since: float | None = None  # wall time
    next_start: float = 0.0  # monotonic
    unhealthy_since: float | None = None
    held: bool = False
    adopted: bool = False
    been_healthy: bool = False
    prepared: bool = False  # the worker answers to its model's names (pulled, copied, checked)
    preparing: bool = False

    def alive(self) -> bool:
        if self.popen is not None:
            code = self.popen.poll()
            if code is not None:
                self.last_exit = code
                return False
            return True
        return is_same_process(self.pid, self.started)

    def row(self) -> dict[str, Any]:
        return {
            "kind": self.spec.kind,
            "pid": self.pid,
            "started": self.started,
            "fingerprint": self.spec.fingerprint,
            "state": self.state,
            "health": self.health,
            "latency_ms": self.latency_ms,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "up_since": self.up_since,
            "held": self.held,
            "model": self.spec.model,
            "gpus": self.spec.gpus,
            "ports": self.spec.ports,
        }


class Supervisor:
    def __init__(
        self,
        state: StateDir,
        specs: list[ProcessSpec],
        spec_path: Path,
        preparers: dict[str, Callable[[], list[str]]] | None = None,
        log_max_bytes: int = logcap.LOG_MAX_BYTES,
    ) -> None:
        self.state = state
        self.log_max_bytes = log_max_bytes
        self.log_failures: set[str] = set()
        self.spec_path = spec_path
        # An on-demand worker waits, held, until the swap coordinator starts it.
        self.procs = {s.name: Managed(s, held=True, state="unloaded") if s.on_demand else Managed(s) for s in specs}
        # Run once a worker first answers its health check; it counts as healthy only after.
        self.preparers = preparers or {}
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.handing_over = False  # stop, leaving the processes running for the next supervisor to adopt
        self.http = httpx.Client(timeout=1.0)

    # -- lifecycle ----------------------------------------------------------------

    def run(self) -> None:
        self.state.write_json(
            self.state.supervisor,
            {
                "pid": os.getpid(),
                "started": start_time(os.getpid()),
                "spec": str(self.spec_path),
                "since": time.time(),
            },
        )
        self.adopt()
        server = self.serve_control()
        health = threading.Thread(target=self.health_loop, name="health", daemon=True)
        health.start()
        try:
            while not self.stopping.is_set():
                with self.lock:
                    self.tick()
                    table = self.table()
                # Written (with its fsync) outside the lock: a control request (a swap's start or stop) never waits
                # for the disk.
                self.state.write_json(self.state.table, table)
                self.cap_logs()
                self.stopping.wait(TICK_S)
        finally:
            server.shutdown()
            server.server_close()
            with self.lock:
                if not self.handing_over:
                    for proc in self.procs.values():
                        self.kill(proc)
                        proc.state = "stopped"
                self.write_table()
            self.cap_logs()
            self.state.socket.unlink(missing_ok=True)
            self.state.supervisor.unlink(missing_ok=True)

    def adopt(self) -> None:
        """Take over processes a previous supervisor left running; stop stale ones."""
        table = self.state.read_json(self.state.table) or {}
        for name, row in (table.get("processes") or {}).items():
            pid, started = row.get("pid"), row.get("started")
            if not is_same_process(pid, started):
                continue
            proc = self.procs.get(name)
            if proc is not None and row.get("fingerprint") == proc.spec.fingerprint:
                proc.pid, proc.started, proc.adopted = pid, started, True
                proc.restarts = int(row.get("restarts") or 0)
                proc.up_since = row.get("up_since")
                proc.state, proc.held = "starting", bool(row.get("held"))
                log(f"adopted {name} (pid {pid})")
            else:
                log(f"stopping {name} (pid {pid}): no longer in the plan or changed")
                self.kill(Managed(ProcessSpec(name, "worker", []), pid=pid, started=started))

    def tick(self) -> None:
        now = time.monotonic()
        for proc in self.procs.values():
            if proc.held:
                continue
            if proc.pid is not None and not proc.alive():
                self.exited(proc, now)
            if proc.pid is None and now >= proc.next_start:
                self.start(proc)
            elif proc.pid is not None and proc.up_since and time.time() - proc.up_since > STABLE_AFTER_S:
                proc.failures = 0
            if (
                proc.pid is not None
                and proc.unhealthy_since is not None
                and proc.been_healthy
                and now - proc.unhealthy_since > UNHEALTHY_RESTART_S
            ):
                log(f"{proc.spec.name}: unhealthy for {UNHEALTHY_RESTART_S:.0f}s, restarting")
                began = proc.up_since
                self.kill(proc)
                proc.up_since = began  # how long it ran decides the backoff
                self.exited(proc, now)

    def start(self, proc: Managed) -> None:
        spec = self.state.log(proc.spec.name)
        spec.parent.mkdir(parents=True, exist_ok=True)
        with spec.open("ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {proc.spec.name}\n".encode())
            out.flush()
            try:
                proc.popen = subprocess.Popen(
                    proc.spec.argv,
                    env={**base_env(), **proc.spec.env},
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group; outlives us for re-adoption
                    close_fds=True,
                )
            except OSError as exc:
                out.write(f"cannot start: {exc}\n".encode())
                proc.failures += 1
                proc.state = "backoff"
                proc.next_start = time.monotonic() + backoff(proc.failures)
                return
        proc.pid = proc.popen.pid
        proc.started = start_time(proc.pid)
        proc.state, proc.health, proc.up_since = "starting", "unknown", time.time()
        proc.unhealthy_since, proc.been_healthy, proc.prepared = None, False, False

    def exited(self, proc: Managed, now: float) -> None:
        ran = time.time() - (proc.up_since or time.time())
        proc.failures = 1 if ran > STABLE_AFTER_S else proc.failures + 1
        delay = backoff(proc.failures)
        log(f"{proc.spec.name} (pid {proc.pid}) exited with {proc.last_exit}; restarting in {delay:.1f}s")
        proc.pid = proc.started = None
        proc.popen = None
        proc.state, proc.health, proc.up_since = "backoff", "down", None
        proc.next_start = now + delay
        proc.restarts += 1

    def kill(self, proc: Managed) -> None:
        """Stop a process and its group: SIGTERM, then SIGKILL after the grace period. A stopped process
        has no uptime and no health (`controller status` after `stop` or `down`)."""
        proc.up_since, proc.health, proc.latency_ms, proc.unhealthy_since = None, "down", None, None
        if proc.pid is None or not proc.alive():
            proc.pid = proc.started = None
            proc.popen = None
            return
        pid = proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and proc.alive():
            time.sleep(0.01)
        if proc.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            while proc.alive():
                time.sleep(0.01)
        proc.pid = proc.started = None
        proc.popen = None

    def cap_logs(self) -> None:
        """Cut back every log past its cap: the processes' and the supervisor's own."""
        for name in [*self.procs, "supervisor"]:
            try:
                logcap.cap(self.state.log(name), self.log_max_bytes)
                self.log_failures.discard(name)
            except OSError as exc:  # a full disk or a removed folder must not stop the supervisor
                if name not in self.log_failures:  # said once, not five times a second
                    self.log_failures.add(name)
                    log(f"cannot cut back the log of {name}: {exc}")

    # -- health -------------------------------------------------------------------

    def health_loop(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                targets = [p for p in self.procs.values() if p.pid is not None and p.spec.health_url]
            for proc in targets:
                ok, latency = self.probe(str(proc.spec.health_url))
                with self.lock:
                    if proc.pid is None:
                        continue
                    proc.latency_ms = latency
                    if ok and not proc.prepared and proc.spec.name in self.preparers:
                        proc.health = "healthy"
                        if not proc.preparing:
                            proc.preparing = True
                            threading.Thread(target=self.prepare, args=(proc,), daemon=True).start()
                    elif ok:
                        proc.health, proc.state, proc.unhealthy_since = "healthy", "healthy", None
                        proc.been_healthy = True
                    else:
                        proc.health = "unhealthy"
                        proc.state = "unhealthy" if proc.been_healthy else "starting"
                        if proc.unhealthy_since is None:
                            proc.unhealthy_since = time.monotonic()
            self.stopping.wait(HEALTH_INTERVAL_S)

    def prepare(self, proc: Managed) -> None:
        """Make a fresh worker answer to its model's names (e.g. Ollama pull and copy)."""
        try:
            for step in self.preparers[proc.spec.name]():
                log(f"{proc.spec.name}: {step}")
            with self.lock:
                proc.prepared = True
        except Exception as exc:  # logged and retried on the next health check; never fatal to the loop
            log(f"{proc.spec.name}: preparing failed: {exc}")
            time.sleep(2)
        finally:
            with self.lock:
                proc.preparing = False

    def probe(self, url: str) -> tuple[bool, float | None]:
        began = time.monotonic()
        try:
            response = self.http.get(url)
        except httpx.HTTPError:
            return False, None
        return response.status_code == 200, round((time.monotonic() - began) * 1000, 2)

    # -- state and control --------------------------------------------------------

    def table(self) -> dict[str, Any]:
        return {
            "supervisor": {"pid": os.getpid(), "updated": time.time(), "spec": str(self.spec_path)},
            "processes": {name: p.row() for name, p in self.procs.items()},
        }

    def write_table(self) -> None:
        self.state.write_json(self.state.table, self.table())

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        action, target = request.get("action"), request.get("target")
        if action == "down":
            self.stopping.set()
            return {"ok": True, "message": "stopping"}
        if action == "handover":  # `controller up` of a changed spec: a new supervisor adopts what did not change
            with self.lock:
                self.handing_over = True
            self.stopping.set()
            return {"ok": True, "message": "handing over"}
        if action == "status":
            with self.lock:
                return {"ok": True, "processes": {n: p.row() for n, p in self.procs.items()}}
        with self.lock:
            proc = self.procs.get(str(target))
            if proc is None:
                return {"ok": False, "message": f"no process {target!r}; known: {', '.join(sorted(self.procs))}"}
            if action == "restart":
                self.kill(proc)
                proc.held, proc.failures, proc.next_start = False, 0, 0.0
                proc.restarts += 1
                self.start(proc)
                return {"ok": True, "message": f"restarted {target} (pid {proc.pid})"}
            if action == "stop":
                self.kill(proc)
                proc.held, proc.state, proc.health = True, "unloaded" if proc.spec.on_demand else "stopped", "down"
                return {"ok": True, "message": f"stopped {target}; `controller start {target}` brings it back"}
            if action == "start":
                proc.held = False
                if proc.pid is None:
                    proc.next_start = 0.0
                    self.start(proc)
                return {"ok": True, "message": f"started {target} (pid {proc.pid})"}
        return {"ok": False, "message": f"unknown action {action!r}"}

    def serve_control(self) -> socketserver.ThreadingUnixStreamServer:
        supervisor = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    request = json.loads(self.rfile.readline(65536) or b"{}")
                    reply = supervisor.control(request if isinstance(request, dict) else {})
                except (ValueError, OSError) as exc:
                    reply = {"ok": False, "message": str(exc)}
                self.wfile.write(json.dumps(reply).encode() + b"\n")

        self.state.socket.unlink(missing_ok=True)
        server = socketserver.ThreadingUnixStreamServer(str(self.state.socket), Handler)
        server.daemon_threads = True
        os.chmod(self.state.socket, 0o600)
        threading.Thread(target=server.serve_forever, name="control", daemon=True).start()
        return server


def preparers(plan: Plan, key_file: Path) -> dict[str, Callable[[], list[str]]]:
    def ensure(backend: str, url: str, model: Model) -> Callable[[], list[str]]:
        def run() -> list[str]:
            with WorkerClient(backend, url, key=read_worker_key(key_file.parent)) as client:
                return client.ensure_model(model)

        return run

    return {
        w.name: ensure(w.backend, f"http://{url_host(w.address)}:{w.port}", plan.model(w.model)) for w in plan.workers
    }


def backoff(failures: int) -> float:
    return float(min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, failures - 1)))


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fleet-supervisor")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--spec", type=Path, required=True)
    args = parser.parse_args(argv)
    state = StateDir(args.state_dir)
    plan = make_plan(load_spec(args.spec))
    supervisor = Supervisor(
        state, local_processes(plan, args.spec, state), args.spec, preparers(plan, state.secrets / KEY_FILE)
    )
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: supervisor.stopping.set())
    log(f"supervisor {os.getpid()} for {args.spec}")
    supervisor.run()
    log("supervisor stopped")
    sys.exit(0)


if __name__ == "__main__":
    main()
