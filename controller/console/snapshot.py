"""The console's picture of the fleet, refreshed about once a second while a console is open.

One collector per gatekeeper, shared by every open console (ten consoles cost what one does). Each refresh asks:

- Envoy's admin interface, once (`/stats` filtered to the worker clusters): each worker's health as Envoy routes
  by it, and its requests in flight and waiting;
- in a `controller up` stack, the supervisor (its Unix socket): each process's state, PID, restarts, health
  latency and the fingerprint of what it runs;
- the swap coordinator (`/swap/status`), where the spec has on-demand models: resident, loading, unloaded, queues;
- Envoy's live log (controller/console/live.py): requests in flight and recently done;
- every GPU host's agent (`/status`, over the mesh on a fleet), each on its own thread every `AGENT_EVERY_S`
  (an agent's answer checks its workers' health first and takes about a second): GPUs, processes, pinning,
  memory against the estimate;
- the ledger's per-day totals, every `USAGE_EVERY_S`: usage per user and model, today and the last 7 days;
- the warnings engine (controller/warnings.py) over all of it, the same one `controller status` and the
  Prometheus alerts follow.

A source that does not answer is shown as such ("no answer"), never as healthy.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from controller.console.live import LiveLog
from controller.gateway.ledger import utc_day
from controller.local.state import StateDir
from controller.plan.models import Plan, Worker
from controller.render.envoy import worker_cluster

AGENT_EVERY_S = 3.0
USAGE_EVERY_S = 10.0  # a summary of 7 days reads many rows: not every second
IDLE_AFTER_S = 10.0  # no console asked for this long: the collector stops asking the sources
GIB = 1024**3
HTTP_TIMEOUT_S = 2.0


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


class Collector:
    def __init__(
        self,
        plan_of: Callable[[], Plan],
        usage_path: Path,
        live: LiveLog,
        stack: StateDir | None,
        warnings_of: Callable[[Plan, dict[str, Any]], list[dict[str, Any]]] | None = None,
        interval_s: float = 1.0,
    ) -> None:
        self.plan_of = plan_of
        self.usage_path = usage_path  # the ledger (controller/gateway/ledger.py), read only
        self.usage_db: sqlite3.Connection | None = None
        self.live = live
        self.stack = stack
        self.warnings_of = warnings_of
        self.interval_s = interval_s
        self.http = httpx.Client(timeout=HTTP_TIMEOUT_S, trust_env=False)
        self.agents: dict[str, dict[str, Any]] = {}  # host → {"doc": /status or None, "error", "at"}
        self.usage: dict[str, Any] = {}
        self.usage_at = 0.0
        self.latest: dict[str, Any] | None = None
        self.asked = 0.0
        self.changed = threading.Condition()
        self.version = 0
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="console-agent")
        self.agent_due: dict[str, float] = {}
        self.agent_busy: set[str] = set()
        self.listeners: list[Callable[[], None]] = []  # called on the collector's thread after each new picture

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        threading.Thread(target=self._loop, name="console", daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        with self.changed:
            self.changed.notify_all()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def want(self) -> None:
        """A console is open (or a snapshot was asked for): keep refreshing for IDLE_AFTER_S more."""
        first = time.monotonic() - self.asked > IDLE_AFTER_S
        self.asked = time.monotonic()
        if first:
            with self.changed:
                self.changed.notify_all()

    def snapshot(self) -> dict[str, Any]:
        """The latest picture; the first one is made now."""
        self.want()
        if self.latest is None:
            self.refresh()
        assert self.latest is not None
        return self.latest

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (on the collector's thread; it must not block) each time a newer picture is made."""
        self.listeners.append(listener)

    def wait_newer(self, version: int, timeout: float) -> int:
        with self.changed:
            if self.version == version and not self.stopping.is_set():
                self.changed.wait(timeout)
            return self.version

    def _loop(self) -> None:
        _lower_priority()
        while not self.stopping.is_set():
            if time.monotonic() - self.asked > IDLE_AFTER_S:
                with self.changed:
                    self.changed.wait(self.interval_s)
                continue
            began = time.monotonic()
            try:
                self.refresh()
            except Exception as exc:  # a bad round must not stop the console; the next one tries again
                print(f"console refresh failed: {exc}", flush=True)
            self.stopping.wait(max(0.05, self.interval_s - (time.monotonic() - began)))

    # -- one refresh ----------------------------------------------------------------

    def refresh(self) -> None:
        plan = self.plan_of()
        now = time.time()
        self._poll_agents(plan)
        self.live.refresh()
        envoy = self._envoy(plan)
        procs = self._supervisor()
        swap = self._swap(plan)
        if time.monotonic() - self.usage_at > USAGE_EVERY_S:
            self.usage, self.usage_at = self._usage(now), time.monotonic()
        doc: dict[str, Any] = {
            "time": now,
            "fleet": plan.fleet.name,
            "mode": "stack" if self.stack is not None else "fleet",
            "workers": [self._card(plan, w, envoy, procs, swap) for w in plan.workers],
            "hosts": self._hosts(plan),
            "requests": self.live.view(),
            "usage": self.usage,
            "swap": swap,
            "sources": {
                "envoy": "ok" if envoy is not None else "no answer",
                "supervisor": None if self.stack is None else ("ok" if procs is not None else "no answer"),
                "swapper": None if not plan.on_demand() else ("ok" if swap is not None else "no answer"),
            },
        }
        doc["warnings"] = self._warnings(plan, doc)
        self.publish(doc)

    def publish(self, doc: dict[str, Any]) -> None:
        """Make ``doc`` the latest picture, and tell whoever waits for one."""
        with self.changed:
            self.latest = doc
            self.version += 1
            self.changed.notify_all()
        for listener in list(self.listeners):
            listener()

    def _warnings(self, plan: Plan, doc: dict[str, Any]) -> list[dict[str, Any]]:
        if self.warnings_of is None:
            return []
        inputs = {"agents": {h: a.get("doc") for h, a in self.agents.items()}, **doc}
        try:
            return self.warnings_of(plan, inputs)
        except Exception as exc:  # shown, not hidden: the console must still draw the rest
            return [{"code": "FleetConsoleWarningsFailed", "severity": "warning", "message": str(exc), "subject": {}}]

    def _envoy(self, plan: Plan) -> dict[str, dict[str, int]] | None:
        port = plan.fleet.gateway.ports.envoy_admin
        wanted = "|".join(("membership_healthy", "upstream_rq_active", "upstream_rq_pending_active"))
        try:
            reply = self.http.get(
                f"http://127.0.0.1:{port}/stats",
                params={"format": "json", "filter": rf"^cluster\.worker_[^.]+\.({wanted})$"},
            )
            stats = reply.json().get("stats") or []
        except (httpx.HTTPError, ValueError):
            return None
        out: dict[str, dict[str, int]] = {}
        for stat in stats:
            name = str(stat.get("name", ""))
            cluster, _, metric = name.removeprefix("cluster.").rpartition(".")
            out.setdefault(cluster, {})[metric] = int(stat.get("value") or 0)
        return out

    def _supervisor(self) -> dict[str, dict[str, Any]] | None:
        if self.stack is None:
            return None
        from controller.local import stack

        try:
            return dict(stack.request(self.stack, "status", timeout=2).get("processes") or {})
        except Exception:
            return None

    def _swap(self, plan: Plan) -> dict[str, Any] | None:
        if not plan.on_demand():
            return None
        try:
            reply = self.http.get(f"http://127.0.0.1:{plan.fleet.gateway.ports.swapper}/swap/status")
            return dict(reply.json())
        except (httpx.HTTPError, ValueError):
            return None

    def _usage(self, now: float) -> dict[str, Any]:
        """Per user and model, today and the last 7 UTC days, from the ledger's per-day totals (its `daily` table:
        one row per user, day and model), on a read-only connection of its own: a decision's reads of the ledger
        never wait for these."""
        days = [utc_day(now - d * 86400) for d in range(7)]
        try:
            if self.usage_db is None:
                self.usage_db = sqlite3.connect(f"file:{self.usage_path}?mode=ro", uri=True, check_same_thread=False)
            rows = self.usage_db.execute(
                "SELECT day, user, model, requests, prompt_tokens, completion_tokens FROM daily WHERE day >= ?",
                (days[-1],),
            ).fetchall()
        except sqlite3.Error as exc:
            self.usage_db = None
            return {"error": f"the ledger cannot be read: {exc}"}
        today: dict[tuple[str, str], list[int]] = {}
        week: dict[tuple[str, str], list[int]] = {}
        for day, user, model, requests, prompt, completion in rows:
            for into, wanted in ((today, day == days[0]), (week, day in days)):
                if wanted:
                    total = into.setdefault((user, model), [0, 0, 0])
                    total[0] += requests
                    total[1] += prompt
                    total[2] += completion

        def listed(totals: dict[tuple[str, str], list[int]]) -> list[dict[str, Any]]:
            return [
                {
                    "user": u,
                    "model": m,
                    "requests": r,
                    "prompt_tokens": p,
                    "completion_tokens": c,
                    "total_tokens": p + c,
                }
                for (u, m), (r, p, c) in sorted(totals.items())
            ]

        return {"day": days[0], "today": listed(today), "week": listed(week)}

    # -- agents ---------------------------------------------------------------------

    def _poll_agents(self, plan: Plan) -> None:
        from controller.deploy.status import agent_url

        now = time.monotonic()
        for host in plan.fleet.hosts or []:
            url = agent_url(plan, host.name)
            if url is None or host.name in self.agent_busy or now < self.agent_due.get(host.name, 0.0):
                continue
            self.agent_busy.add(host.name)
            self.agent_due[host.name] = now + AGENT_EVERY_S
            try:
                self.pool.submit(self._ask_agent, host.name, url)
            except RuntimeError:  # shutting down
                self.agent_busy.discard(host.name)
        for gone in set(self.agents) - {h.name for h in plan.fleet.hosts or []}:
            del self.agents[gone]

    def _ask_agent(self, host: str, url: str) -> None:
        _lower_priority()
        try:
            reply = httpx.get(url, timeout=HTTP_TIMEOUT_S + 1, trust_env=False)
            doc = reply.json() if reply.status_code == 200 else None
            error = None if doc is not None else f"HTTP {reply.status_code}"
        except (httpx.HTTPError, ValueError) as exc:
            doc, error = None, f"no answer ({type(exc).__name__})"
        self.agents[host] = {"doc": doc, "error": error, "at": time.time()}
        self.agent_busy.discard(host)

    # -- the picture ----------------------------------------------------------------

    def _card(
        self,
        plan: Plan,
        w: Worker,
        envoy: dict[str, dict[str, int]] | None,
        procs: dict[str, dict[str, Any]] | None,
        swap: dict[str, Any] | None,
    ) -> dict[str, Any]:
        stats = (envoy or {}).get(worker_cluster(w.name))
        agent_doc = (self.agents.get(w.host) or {}).get("doc") or {}
        seen = next((x for x in agent_doc.get("workers") or [] if x.get("name") == w.name), None)
        proc = (procs or {}).get(w.name)
        slot = ((swap or {}).get("workers") or {}).get(w.name)
        on_demand = plan.model(w.model).swap is not None  # as plan.on_demand() says, without a walk per card
        residency = None
        if slot is not None:
            residency = slot.get("state")
            if residency == "unloaded" and w.backend == "vllm" and slot.get("loads"):
                residency = "sleeping"  # an evicted vLLM sleeps: started once, then woken and put to sleep
        elif not on_demand:
            residency = "resident"
        health, latency_ms = "unknown", None
        if stats is not None:
            health = "up" if stats.get("membership_healthy", 0) > 0 else "down"
        if proc is not None:
            latency_ms = proc.get("latency_ms")
            # A resident worker serves only once its process passed a health check: one that was killed and
            # restarted within a health-check interval is still down while it starts, whatever Envoy last saw.
            down = ("backoff", "stopped", "unhealthy") if on_demand else ("backoff", "stopped", "unhealthy", "starting")
            if proc.get("pid") is None or proc.get("state") in down:
                health = "down" if not (on_demand and proc.get("held")) else health
        elif seen is not None:
            h = seen.get("health") or {}
            latency = h.get("latency_seconds")
            latency_ms = None if latency is None else round(float(latency) * 1000, 1)
            if h.get("up") is False and not on_demand:
                health = "down"
        if on_demand and residency in ("unloaded", "sleeping") and health == "down":
            health = "idle"  # not loaded on purpose: its requests go to the swap coordinator, which loads it
        image = getattr(
            plan.fleet.images, "llamacpp_cpu" if w.backend == "llamacpp" and w.device == "cpu" else w.backend
        )
        fingerprint = (proc or {}).get("fingerprint")
        return {
            "name": w.name,
            "model": w.model,
            "host": w.host,
            "backend": w.backend,
            "device": w.device,
            "gpus": [{"uuid": g.uuid, "index": g.index, "name": g.name} for g in w.gpus],
            "health": health,
            "latency_ms": latency_ms,
            "pinning": (seen or {}).get("pinning") or ("n/a" if w.device == "cpu" else "unknown"),
            "residency": residency,
            "on_demand": on_demand,
            "image": image,
            "version": str(fingerprint)[:12] if fingerprint else None,
            "in_flight": None if stats is None else stats.get("upstream_rq_active", 0),
            "queued": (None if stats is None else stats.get("upstream_rq_pending_active", 0))
            if slot is None
            else int(slot.get("waiting") or 0) + int((stats or {}).get("upstream_rq_pending_active", 0)),
            "state": (proc or {}).get("state"),
            "pid": (proc or {}).get("pid"),
            "restarts": (proc or {}).get("restarts"),
            "estimate_gib": round(w.footprint_gib, 2),
            "memory": (seen or {}).get("memory"),
        }

    def _hosts(self, plan: Plan) -> list[dict[str, Any]]:
        planned = {u.gpu.uuid: u for u in plan.gpus}
        out = []
        for host in plan.fleet.hosts or []:
            seen = self.agents.get(host.name)
            doc = (seen or {}).get("doc") or {}
            reading = {g.get("uuid"): g for g in doc.get("gpus") or []}
            gpus = []
            for g in host.gpus or []:
                r = reading.get(g.uuid) or {}
                use = planned.get(g.uuid)
                used, total = r.get("memory_used_bytes"), r.get("memory_total_bytes")
                gpus.append(
                    {
                        "index": None if use is None else use.gpu.index,
                        "uuid": g.uuid,
                        "name": r.get("name") or g.name,
                        "utilization": r.get("utilization_ratio"),
                        "memory_used_gib": None if used is None else round(used / GIB, 2),
                        "memory_total_gib": round(total / GIB, 2) if total else g.vram_gib,
                        "planned_gib": None if use is None else round(use.used_gib, 2),
                        "workers": [] if use is None else list(use.workers),
                        "power_w": r.get("power_watts"),
                        "power_limit_w": r.get("power_limit_watts"),
                        "temperature_c": r.get("temperature_celsius"),
                        "throttle": r.get("throttle"),
                        "processes": [
                            {
                                "pid": p.get("pid"),
                                "memory_gib": round(int(p.get("memory_bytes") or 0) / GIB, 2),
                                "worker": p.get("worker"),
                            }
                            for p in r.get("processes") or []
                        ]
                        if r.get("processes") is not None
                        else None,
                    }
                )
            agent: str | None = None
            if seen is not None:
                agent = "ok" if seen.get("doc") is not None else str(seen.get("error"))
            out.append(
                {
                    "name": host.name,
                    "address": str(host.address),
                    "agent": agent,
                    "nvml": doc.get("nvml"),
                    "gpus": gpus,
                }
            )
        return out


NICE = 10  # the console's threads yield the CPU to the gatekeeper's decisions, which are on the request path


def _lower_priority() -> None:
    """Lower this thread's CPU priority (Linux schedules threads by their own nice value)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux, or not allowed: the process's priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
