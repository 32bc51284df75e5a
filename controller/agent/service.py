"""The host agent: GPU telemetry from NVML, and which worker owns which GPU process.

One agent runs on each GPU host (on a workstation, inside `controller up`).
It knows the workers the plan puts on its host and answers:

    GET /metrics   Prometheus: per GPU (UUID) utilization, memory, power, temperature,
                   clocks, throttle reasons, ECC errors, process memory; per worker
                   pinning state, health and health-check latency, GPU memory taken
                   against the plan's estimate (memory.py); NVML up or down
    GET /status    the same facts as JSON, with reasons (a `memory_warning` per worker
                   whose memory misses its estimate by more than 10 %)
    GET /healthz   the agent itself answers

and, for the swap coordinator, with "Authorization: Bearer <worker secret>" (else 401),
for the on-demand workers of its host (their model has `swap`; residency.py):

    POST /v1/workers/{name}/load       make it resident; {"worker", "state": "resident",
                                       "load_s", "measured_gib", "estimate_gib", ...}
    POST /v1/workers/{name}/unload     free its GPU memory; {"worker", "state", "unload_s", ...}
    GET  /v1/workers/{name}/residency  {"worker", "state": resident|sleeping|starting|unloaded, ...}
    POST /v1/workers/{name}/restart    restart a running worker's container (any worker of this host)

A failure is {"worker", "detail"} with 404 (no such worker here), 409 (not on demand, or
not possible in its state or setup), 500 (it failed) or 503 (no worker secret here).

Everything is collected when asked (a custom Prometheus collector, no
background loop), within bounded time: NVML under a timeout, worker health
checks in parallel with a short timeout. A fact the agent cannot establish
is absent, never a made-up number.

Which worker owns a GPU process: on a workstation, the local stack's process
table (state.json) names each worker's PID, and a GPU process belongs to the
worker whose process it is, descends from, or shares a session with; in
containers, the PID's cgroup names the container (`fleet-<worker>`, or the
Quadlet unit `fleet-<worker>.service`), resolved from a container id through
the Docker Engine API (the `docker` SDK), which Docker and podman's compatible
socket both serve.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import docker
import docker.constants
import docker.errors
import httpx
import requests
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from controller import backends
from controller.agent.memory import MemoryCheck, measure
from controller.agent.nvml import GpuFacts, Nvml, NvmlReader, NvmlReading, Pynvml
from controller.agent.residency import (
    RESIDENT,
    DockerEngine,
    Engine,
    Residency,
    ResidencyError,
    api_version,
    listening,
)
from controller.agent.residency import engine_socket as engine_socket  # where it was: tests import it from here
from controller.backends.client import listed_names, missing_names, models_path
from controller.errors import ControllerError
from controller.plan import make_plan
from controller.plan.models import Worker
from controller.render.containers import SECRETS_HOST_DIR, WORKER_KEY
from controller.secrets import KEY_FILE
from controller.spec import load_spec
from controller.spec.models import Host, Model

PINNING_STATES = ("ok", "wrong_gpu", "not_found")
HEALTH_TIMEOUT_S = 1.0  # per worker; checks run in parallel, so a scrape waits about this long for all
HEALTH_PARALLEL = 8
SNAPSHOT_MAX_AGE_S = 1.0  # /metrics and /status within a second share one round of calls
ANCESTRY_MAX = 64  # bound the walk up a process tree
CONTAINER_ID = re.compile(r"(?<![0-9a-f])([0-9a-f]{64})(?![0-9a-f])")
QUADLET_UNIT = re.compile(r"(?:^|/)fleet-([a-z0-9][a-z0-9-]*)\.service(?:/|$)")
NAME_CACHE_MAX = 4096  # container ids remembered; bounded so churn cannot grow memory
NAME_MISS_TTL_S = 30.0  # an id the engine does not know (not its container) is asked again after this


# -- which worker owns a PID ------------------------------------------------------


class ContainerNames(Protocol):
    """Container id → container name, or None when unknown."""

    def __call__(self, container_id: str, /) -> str | None: ...


@dataclass(frozen=True)
class ProcStat:
    ppid: int
    session: int
    started: int


class ProcFs:
    """The few /proc facts the agent reads; ``root`` is a folder in tests."""

    def __init__(self, root: Path = Path("/proc")) -> None:
        self.root = root

    def stat(self, pid: int) -> ProcStat | None:
        try:
            text = (self.root / str(pid) / "stat").read_text()
        except OSError:
            return None
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = text[text.rfind(")") + 2 :].split()
        try:
            return ProcStat(ppid=int(fields[1]), session=int(fields[3]), started=int(fields[19]))
        except (IndexError, ValueError):
            return None

    def cgroup(self, pid: int) -> str | None:
        try:
            return (self.root / str(pid) / "cgroup").read_text()
        except OSError:
            return None


class EngineNames:
    """Container names from the Docker Engine API through the `docker` SDK (Docker, or podman's compatible socket).

    Never raises: every failure is None, remembered like a miss (NAME_MISS_TTL_S), so a dead engine costs
    at most one timeout per id and TTL, not one per scrape. What the SDK raises, all caught here:

    - ``docker.errors.NotFound`` (a 404): the engine has no such container, i.e. it is not this engine's;
    - ``docker.errors.APIError``: any other error answer of the engine (NotFound's base class);
    - ``docker.errors.DockerException``: the base of the SDK's own errors (here: an engine that names no
      API version, or one older than the SDK supports);
    - ``requests.exceptions`` (``ConnectionError``, ``Timeout``, ``HTTPError``, all ``RequestException``):
      the socket refused, vanished or did not answer within ``timeout_s``; the SDK lets them through unwrapped.

    After anything but an engine's answer the client is dropped and the next lookup starts a new one: the
    engine may have restarted, with another API version. Lookups come one at a time (the agent collects a
    snapshot under its lock), so the one client needs no lock of its own.
    """

    def __init__(self, socket: Path | None = None, timeout_s: float = 1.0) -> None:
        self.socket = socket
        self.timeout_s = timeout_s
        # id → (name or None, monotonic expiry): a name never changes for an id; a miss is asked again later
        self._cache: dict[str, tuple[str | None, float]] = {}
        self._client: docker.DockerClient | None = None
        self._client_socket: Path | None = None

    def __call__(self, container_id: str, /) -> str | None:
        now = time.monotonic()
        hit = self._cache.get(container_id)
        if hit is not None and hit[1] > now:
            return hit[0]
        name = self._ask(container_id)
        if len(self._cache) >= NAME_CACHE_MAX:
            self._cache.clear()
        self._cache[container_id] = (name, float("inf") if name else now + NAME_MISS_TTL_S)
        return name

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = self._client_socket = None

    def _ask(self, container_id: str) -> str | None:
        socket_path = self.socket or engine_socket()
        if socket_path is None or not socket_path.is_socket():
            return None
        if self._client_socket != socket_path and not listening(socket_path, self.timeout_s):
            return None  # no engine there (yet, or any more): see `listening`
        try:
            name = self._connect(socket_path).containers.get(container_id).name
        except docker.errors.APIError:  # NotFound included: the engine answered, the client is fine
            return None
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError):
            self.close()
            return None
        return name if isinstance(name, str) and name else None

    def _connect(self, socket_path: Path) -> docker.DockerClient:
        if self._client is None or self._client_socket != socket_path:
            self.close()
            url = f"unix://{socket_path}"
            self._client = docker.DockerClient(base_url=url, version=self._api_version(url), timeout=self.timeout_s)
            self._client_socket = socket_path
        return self._client

    def _api_version(self, url: str) -> str:
        return api_version(url, self.timeout_s)


class ProcessOwners:
    """Maps GPU PIDs to the planned worker that owns them, or None when no worker does."""

    def __init__(
        self,
        workers: Iterable[str],
        state_dir: Path | None = None,
        container_names: ContainerNames | None = None,
        proc: ProcFs | None = None,
    ) -> None:
        self.workers = set(workers)
        self.state_dir = state_dir
        self.container_names = container_names
        self.proc = proc or ProcFs()

    def owners(self, pids: Iterable[int]) -> dict[int, str | None]:
        roots = self.local_roots()
        return {pid: self.local_owner(pid, roots) or self.container_owner(pid) for pid in pids}

    def local_roots(self) -> dict[int, str]:
        """Worker PIDs from the local stack's process table, kept only while that very process runs."""
        if self.state_dir is None:
            return {}
        try:
            table = json.loads((self.state_dir / "state.json").read_text(encoding="utf-8"))
            rows = table.get("processes") or {}
        except (OSError, ValueError, AttributeError):
            return {}
        if not isinstance(rows, dict):
            return {}
        roots: dict[int, str] = {}
        for name, row in rows.items():
            if name not in self.workers or not isinstance(row, dict) or row.get("kind") != "worker":
                continue
            pid = row.get("pid")
            stat = self.proc.stat(pid) if isinstance(pid, int) else None
            if isinstance(pid, int) and stat is not None and stat.started == row.get("started"):  # PIDs are reused
                roots[pid] = name
        return roots

    def local_owner(self, pid: int, roots: dict[int, str]) -> str | None:
        """The worker whose process this is, or whose descendant; the supervisor starts each in its own session."""
        current = pid
        for _ in range(ANCESTRY_MAX):
            if current in roots:
                return roots[current]
            stat = self.proc.stat(current)
            if stat is None:
                return None
            if stat.session in roots:
                return roots[stat.session]
            if stat.ppid <= 1:
                return None
            current = stat.ppid
        return None

    def container_owner(self, pid: int) -> str | None:
        text = self.proc.cgroup(pid)
        if not text:
            return None
        ids: list[str] = []
        for line in text.splitlines():
            path = line.split(":", 2)[-1]  # hierarchy-ID:controllers:path
            unit = QUADLET_UNIT.search(path)
            if unit and unit.group(1) in self.workers:
                return unit.group(1)
            found = CONTAINER_ID.findall(path)
            if found and found[-1] not in ids:  # the innermost id; cgroup v1 repeats it once per controller
                ids.append(found[-1])
        names = self.container_names
        if names is None:
            return None
        for container_id in ids:
            name = names(container_id) or ""
            if name.startswith("fleet-") and name.removeprefix("fleet-") in self.workers:
                return name.removeprefix("fleet-")
        return None


# -- one round of facts -----------------------------------------------------------


@dataclass(frozen=True)
class Health:
    url: str
    up: bool
    latency_seconds: float | None  # None when no HTTP answer came back
    error: str | None


@dataclass(frozen=True)
class Pinning:
    state: str  # ok, wrong_gpu, not_found, or unknown (no metric: NVML could not tell)
    reason: str


@dataclass(frozen=True)
class WorkerView:
    worker: Worker
    pinning: Pinning
    health: Health
    processes: list[tuple[str, int, int | None]]  # (GPU UUID, PID, GPU memory bytes)
    memory: MemoryCheck | None = None  # None for a worker with no GPU
    # The served names of the worker's model that it does not list (its /v1/models, Ollama's /api/tags): [] all
    # there; None not known (the worker is down, or its list did not come back).
    missing: list[str] | None = None


@dataclass(frozen=True)
class Snapshot:
    host: str
    taken: float
    nvml: NvmlReading
    owners: dict[int, str | None]
    workers: list[WorkerView]
    missing_gpus: list[str]  # planned UUIDs NVML does not show on this host


def pinning(worker: Worker, found: list[tuple[str, int, int | None]], reading: NvmlReading) -> Pinning:
    planned = sorted(g.uuid for g in worker.gpus)
    wrong = sorted({uuid for uuid, _, _ in found if uuid not in planned})
    if wrong:
        return Pinning("wrong_gpu", f"processes on {', '.join(wrong)}; planned: {', '.join(planned) or 'no GPU'}")
    if found:
        return Pinning("ok", "processes on planned GPUs only")
    if not planned:
        if reading.complete:
            return Pinning("ok", "no GPU planned and none used")
        return Pinning("ok", f"no GPU planned (no GPU device given); GPU use not checked: {nvml_problem(reading)}")
    if not reading.complete:
        return Pinning("unknown", f"cannot tell: {nvml_problem(reading)}")
    return Pinning("not_found", "no process of this worker on any GPU")


def nvml_problem(reading: NvmlReading) -> str:
    if not reading.up:
        return f"NVML down ({reading.reason})"
    unreadable = reading.errors + [
        f"GPU {g.index} processes: {g.errors.get('processes', 'not supported')}"
        for g in reading.gpus or []
        if g.processes is None
    ]
    return "; ".join(unreadable) or "unknown"


def health_url(worker: Worker) -> str:
    host = f"[{worker.address}]" if ":" in worker.address else worker.address
    return f"http://{host}:{worker.port}{backends.get(worker.backend).health_path}"


def probe(http: httpx.Client, url: str) -> Health:
    began = time.monotonic()
    try:
        response = http.get(url)
    except httpx.HTTPError as exc:
        return Health(url, False, None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    latency = time.monotonic() - began
    ok = response.status_code == 200
    return Health(url, ok, latency, None if ok else f"HTTP {response.status_code}")


def serves(http: httpx.Client, worker: Worker, model: Model | None, key: str | None) -> tuple[Health, list[str] | None]:
    """The worker's health and, once it answers, the names of its model it does not list (see WorkerView)."""
    health = probe(http, health_url(worker))
    if not health.up or model is None:
        return health, None
    host = f"[{worker.address}]" if ":" in worker.address else worker.address
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        answer = http.get(f"http://{host}:{worker.port}{models_path(worker.backend)}", headers=headers)
        if answer.status_code != 200:
            return health, None
        return health, missing_names(worker.backend, model, listed_names(worker.backend, answer.json()))
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return health, None


class Agent:
    def __init__(
        self,
        host: Host,
        workers: list[Worker],
        reader: NvmlReader,
        owners: ProcessOwners,
        max_age_s: float = SNAPSHOT_MAX_AGE_S,
        health_timeout_s: float = HEALTH_TIMEOUT_S,
        models: Mapping[str, Model] | None = None,
        residency: Residency | None = None,
        worker_key: Callable[[], str | None] = lambda: None,
    ) -> None:
        """``models``: the spec's models by name (the workers' own); ``residency``: loads and unloads on-demand
        workers (none: the load routes refuse); ``worker_key``: the worker secret, the bearer token those routes
        require (None: refused)."""
        self.host = host
        self.workers = workers
        self.reader = reader
        self.owners = owners
        self.max_age_s = max_age_s
        self.models = dict(models or {})
        self.residency = residency
        self.worker_key = worker_key
        self.http = httpx.Client(timeout=health_timeout_s, trust_env=False)  # mesh and loopback only: no proxies
        self.pool = ThreadPoolExecutor(max_workers=HEALTH_PARALLEL, thread_name_prefix="health")
        self._lock = threading.Lock()
        self._last: Snapshot | None = None

    def snapshot(self) -> Snapshot:
        with self._lock:
            if self._last is not None and time.monotonic() - self._last.taken <= self.max_age_s:
                return self._last
            self._last = self._collect()
            return self._last

    def fresh_snapshot(self) -> Snapshot:
        """A snapshot taken now, not one from before (after a load: what the worker holds now)."""
        with self._lock:
            self._last = self._collect()
            return self._last

    def forget(self) -> None:
        """Drop the shared snapshot: a load or unload changed what it would say."""
        with self._lock:
            self._last = None

    def on_demand(self, name: str) -> tuple[Worker, Model]:
        """The worker of this host's plan named ``name`` and its model, if that model is on demand (`swap`)."""
        worker = next((w for w in self.workers if w.name == name), None)
        if worker is None:
            known = ", ".join(w.name for w in self.workers) or "none"
            raise ResidencyError(404, f"no worker {name!r} on host {self.host.name}; its workers: {known}")
        model = self.models.get(worker.model)
        if model is None or model.swap is None:
            raise ResidencyError(
                409, f"worker {name} is not an on-demand worker (its model {worker.model} has no `swap`)"
            )
        return worker, model

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()
        self.reader.close()
        if isinstance(self.owners.container_names, EngineNames):
            self.owners.container_names.close()
        if self.residency is not None:
            self.residency.close()

    def _collect(self) -> Snapshot:
        key = self.worker_key()
        checks = {w.name: self.pool.submit(serves, self.http, w, self.models.get(w.model), key) for w in self.workers}
        reading = self.reader.read()
        gpus = reading.gpus or []
        owners = self.owners.owners(p.pid for g in gpus for p in g.processes or [])
        views = []
        for worker in self.workers:
            found = [
                (g.uuid, p.pid, p.memory_bytes) for g in gpus for p in g.processes or [] if owners[p.pid] == worker.name
            ]
            health, missing = checks[worker.name].result()
            views.append(
                WorkerView(worker, pinning(worker, found, reading), health, found, self._memory(worker, found), missing)
            )
        seen = {g.uuid for g in gpus}
        missing = [g.uuid for g in self.host.gpus if g.uuid not in seen] if reading.up and not reading.errors else []
        return Snapshot(self.host.name, time.monotonic(), reading, owners, views, missing)

    def _memory(self, worker: Worker, found: list[tuple[str, int, int | None]]) -> MemoryCheck | None:
        if not worker.gpus:
            return None
        # An on-demand worker is compared once this agent has loaded it, until it unloads it: asleep or unloaded it
        # holds less than booked by design (a sleeping vLLM keeps its CUDA context), which is no miss.
        model = self.models.get(worker.model)
        compared = True
        if model is not None and model.swap is not None:
            compared = self.residency is not None and self.residency.left.get(worker.name) == RESIDENT
        return measure(worker.name, worker.footprint_gib, [g.uuid for g in worker.gpus], found, compared)


# -- Prometheus -------------------------------------------------------------------

GPU_LABELS = ["host", "uuid", "index", "name"]
GPU_GAUGES = [
    ("fleet_gpu_utilization_ratio", "utilization_ratio", "Fraction of the last sample period a kernel ran (0..1)."),
    ("fleet_gpu_memory_used_bytes", "memory_used_bytes", "GPU memory in use."),
    ("fleet_gpu_memory_total_bytes", "memory_total_bytes", "GPU memory in all."),
    ("fleet_gpu_power_watts", "power_watts", "Power drawn by the board."),
    ("fleet_gpu_power_limit_watts", "power_limit_watts", "The power limit in force."),
    ("fleet_gpu_temperature_celsius", "temperature_celsius", "GPU die temperature."),
    ("fleet_gpu_sm_clock_hertz", "sm_clock_hertz", "Current SM clock."),
    ("fleet_gpu_memory_clock_hertz", "memory_clock_hertz", "Current memory clock."),
]


def metric_families(snap: Snapshot) -> list[Metric]:
    """Every metric of one snapshot; a family with no samples is left out."""
    gpus = snap.nvml.gpus or []
    out: list[Metric] = []
    for metric, attr, doc in GPU_GAUGES:
        family = GaugeMetricFamily(metric, doc, labels=GPU_LABELS)
        for gpu in gpus:
            value = getattr(gpu, attr)
            if value is not None:
                family.add_metric(gpu_labels(snap, gpu), float(value))
        out.append(family)
    throttle = GaugeMetricFamily(
        "fleet_gpu_throttle_active",
        "1 while clocks are held down for this reason (NVML clocks event reasons).",
        labels=[*GPU_LABELS, "reason"],
    )
    ecc = CounterMetricFamily(
        "fleet_gpu_ecc_errors",
        "Volatile ECC memory errors since the driver loaded, where ECC is supported and on.",
        labels=[*GPU_LABELS, "type"],
    )
    process_memory = GaugeMetricFamily(
        "fleet_gpu_process_memory_bytes",
        "GPU memory of one compute process; worker is empty when no worker owns it.",
        labels=["uuid", "pid", "worker"],
    )
    unmanaged = GaugeMetricFamily(
        "fleet_gpu_unmanaged_processes", "Compute processes on this GPU that no worker owns.", labels=GPU_LABELS
    )
    for gpu in gpus:
        labels = gpu_labels(snap, gpu)
        for reason, active in (gpu.throttle or {}).items():
            throttle.add_metric([*labels, reason], float(active))
        for kind, count in (gpu.ecc_errors or {}).items():
            ecc.add_metric([*labels, kind], float(count))
        if gpu.processes is None:
            continue
        for proc in gpu.processes:
            if proc.memory_bytes is not None:
                process_memory.add_metric([gpu.uuid, str(proc.pid), snap.owners.get(proc.pid) or ""], proc.memory_bytes)
        unmanaged.add_metric(labels, float(sum(1 for p in gpu.processes if snap.owners.get(p.pid) is None)))
    out += [throttle, ecc, process_memory, unmanaged, *worker_families(snap)]
    nvml_up = GaugeMetricFamily("fleet_agent_nvml_up", "1 when NVML answers on this host.", labels=["host"])
    nvml_up.add_metric([snap.host], float(snap.nvml.up))
    out.append(nvml_up)
    return [family for family in out if family.samples]


def worker_families(snap: Snapshot) -> list[Metric]:
    pin = GaugeMetricFamily(
        "fleet_worker_pinning",
        "1 for the worker's GPU pinning state (ok, wrong_gpu, not_found), 0 for the others.",
        labels=["worker", "model", "state"],
    )
    up = GaugeMetricFamily(
        "fleet_worker_up", "1 when the worker's health endpoint answers 200.", labels=["worker", "model"]
    )
    latency = GaugeMetricFamily(
        "fleet_worker_health_latency_seconds", "Time the worker's health endpoint took to answer.", labels=["worker"]
    )
    measured = GaugeMetricFamily(
        "fleet_worker_memory_measured_bytes",
        "GPU memory the worker's processes hold on this GPU (NVML, per process), where known.",
        labels=["worker", "gpu"],
    )
    estimate = GaugeMetricFamily(
        "fleet_worker_memory_estimate_bytes",
        "GPU memory the plan books for the worker on each of its GPUs (its footprint).",
        labels=["worker", "gpu"],
    )
    miss = GaugeMetricFamily(
        "fleet_worker_memory_estimate_miss_ratio",
        "measured / estimate - 1 on the worker's GPU furthest from its estimate; absent when nothing is measured, "
        "and for an on-demand worker but between this agent's load and unload of it. Beyond +-0.1 the agent warns.",
        labels=["worker"],
    )
    absent = GaugeMetricFamily(
        "fleet_worker_model_missing",
        "1 when the worker answers but does not list a name of its model the spec has it serve (absent while "
        "that is not known: the worker is down, or its model list did not come back).",
        labels=["worker", "model"],
    )
    for view in snap.workers:
        name, model = view.worker.name, view.worker.model
        if view.missing is not None:
            absent.add_metric([name, model], float(bool(view.missing)))
        if view.pinning.state in PINNING_STATES:
            for state in PINNING_STATES:
                pin.add_metric([name, model, state], float(state == view.pinning.state))
        up.add_metric([name, model], float(view.health.up))
        if view.health.latency_seconds is not None:
            latency.add_metric([name], view.health.latency_seconds)
        if view.memory is not None:
            for uuid in view.memory.planned:
                estimate.add_metric([name, uuid], float(view.memory.estimate_bytes))
            for uuid, used in sorted(view.memory.measured.items()):
                measured.add_metric([name, uuid], float(used))
            ratio = view.memory.miss_ratio
            if ratio is not None:
                miss.add_metric([name], ratio)
    return [pin, up, latency, measured, estimate, miss, absent]


def gpu_labels(snap: Snapshot, gpu: GpuFacts) -> list[str]:
    return [snap.host, gpu.uuid, str(gpu.index), gpu.name]


class AgentCollector:
    """Collects on scrape: one snapshot per scrape (shared with /status within SNAPSHOT_MAX_AGE_S)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterable[Metric]:
        return metric_families(self.agent.snapshot())


# -- JSON status ------------------------------------------------------------------


def status(snap: Snapshot) -> dict[str, Any]:
    gpus = snap.nvml.gpus or []
    planned_on = {
        g.uuid: [v.worker.name for v in snap.workers if g.uuid in {r.uuid for r in v.worker.gpus}] for g in gpus
    }
    return {
        "host": snap.host,
        "nvml": {"up": snap.nvml.up, "reason": snap.nvml.reason, "errors": snap.nvml.errors},
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "utilization_ratio": g.utilization_ratio,
                "memory_used_bytes": g.memory_used_bytes,
                "memory_total_bytes": g.memory_total_bytes,
                "power_watts": g.power_watts,
                "power_limit_watts": g.power_limit_watts,
                "temperature_celsius": g.temperature_celsius,
                "sm_clock_hertz": g.sm_clock_hertz,
                "memory_clock_hertz": g.memory_clock_hertz,
                "throttle": g.throttle,
                "ecc_errors": g.ecc_errors,
                "processes": None
                if g.processes is None
                else [
                    {"pid": p.pid, "memory_bytes": p.memory_bytes, "worker": snap.owners.get(p.pid)}
                    for p in g.processes
                ],
                "unmanaged_processes": None
                if g.processes is None
                else sum(1 for p in g.processes if snap.owners.get(p.pid) is None),
                "planned_workers": planned_on.get(g.uuid, []),
                "unsupported": sorted(set(g.unsupported)),
                "errors": g.errors,
            }
            for g in gpus
        ],
        "missing_gpus": snap.missing_gpus,
        "workers": [
            {
                "name": v.worker.name,
                "model": v.worker.model,
                "backend": v.worker.backend,
                "gpus": [g.uuid for g in v.worker.gpus],
                "pinning": v.pinning.state,
                "pinning_reason": v.pinning.reason,
                "processes": [{"uuid": u, "pid": pid, "memory_bytes": mem} for u, pid, mem in v.processes],
                "health": {
                    "url": v.health.url,
                    "up": v.health.up,
                    "latency_seconds": v.health.latency_seconds,
                    "error": v.health.error,
                },
                "memory": None if v.memory is None else v.memory.as_dict(),
                "memory_warning": None if v.memory is None else v.memory.warning,
                "missing_names": v.missing,
            }
            for v in snap.workers
        ],
        "unmanaged": [
            {"uuid": g.uuid, "index": g.index, "pid": p.pid, "memory_bytes": p.memory_bytes}
            for g in gpus
            for p in g.processes or []
            if snap.owners.get(p.pid) is None
        ],
    }


# -- the service ------------------------------------------------------------------


def build_agent(
    spec_path: Path,
    host_name: str,
    state_dir: Path | None = None,
    nvml: Nvml | None = None,
    container_names: ContainerNames | None = None,
    engine: Engine | None = None,
    worker_key_file: Path | None = None,
    **options: Any,
) -> Agent:
    """``engine``: the container engine on-demand workers are started and stopped through (default: the Docker
    Engine API at the usual places); ``worker_key_file``: the worker secret (default: see `key_files`)."""
    plan = make_plan(load_spec(spec_path))
    try:
        host = plan.host(host_name)
    except KeyError:
        known = ", ".join(h.name for h in plan.fleet.hosts or [])
        raise ControllerError(f"{spec_path}: no host {host_name!r}; hosts: {known}") from None
    workers = plan.workers_on(host_name)
    owners = ProcessOwners([w.name for w in workers], state_dir, container_names or EngineNames())
    key = worker_key_reader(key_files(worker_key_file, state_dir))
    models = {m.name: m for m in plan.fleet.models}
    residency = Residency(engine or DockerEngine(), key)
    return Agent(
        host,
        workers,
        NvmlReader(nvml or Pynvml()),
        owners,
        models=models,
        residency=residency,
        worker_key=key,
        **options,
    )


def key_files(given: Path | None, state_dir: Path | None) -> list[Path]:
    """Where the agent looks for the worker secret: the file given, else a local stack's (``<state>/secrets``),
    the agent container's secret (``/run/secrets/worker_key``) and the host's (``/etc/fleet/secrets``)."""
    if given is not None:
        return [given]
    out = [state_dir / "secrets" / KEY_FILE] if state_dir is not None else []
    return [*out, Path(WORKER_KEY[2]), Path(SECRETS_HOST_DIR) / KEY_FILE]


def worker_key_reader(paths: list[Path]) -> Callable[[], str | None]:
    """The worker secret from the first of ``paths`` that holds one, read at each call (a replaced key counts)."""

    def read() -> str | None:
        for path in paths:
            try:
                key = path.read_text(encoding="utf-8").strip()
            except OSError:
                continue
            if key:
                return key
        return None

    return read


def refusal(agent: Agent, authorization: str | None) -> JSONResponse | None:
    """None when ``authorization`` is "Bearer <worker secret>"; else the answer (401; 503 without a secret)."""
    key = agent.worker_key()
    if not key:
        return JSONResponse(
            {"detail": "this agent has no worker secret (--worker-key-file): loading and unloading are off"},
            status_code=503,
        )
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        return JSONResponse(
            {"detail": "a bearer token, the worker secret, is required"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    return None


def residency_call(agent: Agent, name: str, authorization: str | None, action: str) -> JSONResponse:
    """One load, unload or residency question, authenticated, as JSON; a failure is {"worker", "detail"}."""
    refused = refusal(agent, authorization)
    if refused is not None:
        return refused
    try:
        if agent.residency is None:
            raise ResidencyError(503, "this agent does not load or unload workers")
        worker, model = agent.on_demand(name)
        if action == "state":
            answer = agent.residency.state(worker, model)
            view = next((v for v in agent.snapshot().workers if v.worker.name == name), None)
            memory = None if view is None else view.memory
            answer |= {
                "measured_gib": None if memory is None else memory.measured_gib,
                "estimate_gib": round(worker.footprint_gib, 2),
            }
            return JSONResponse(answer)
        try:
            answer = agent.residency.load(worker, model) if action == "load" else agent.residency.unload(worker, model)
        finally:
            agent.forget()
        if action == "load":
            view = next(v for v in agent.fresh_snapshot().workers if v.worker.name == name)
            memory = view.memory
            answer |= {
                "measured_gib": None if memory is None else memory.measured_gib,
                "estimate_gib": round(worker.footprint_gib, 2),
                "memory_warning": None if memory is None else memory.warning,
            }
        return JSONResponse(answer)
    except ResidencyError as exc:
        return JSONResponse({"worker": name, "detail": exc.message}, status_code=exc.status)


def create_app(agent: Agent) -> FastAPI:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        agent.close()

    app = FastAPI(title="fleet agent", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.agent = agent

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/status")
    def get_status() -> dict[str, Any]:
        return status(agent.snapshot())

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # On-demand workers, for the swap coordinator; each needs "Authorization: Bearer <worker secret>". Plain `def`:
    # a load (up to LOAD_TIMEOUT_S) waits in a worker thread, never in the event loop.
    @app.post("/v1/workers/{name}/load")
    def load(name: str, authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
        return residency_call(agent, name, authorization, "load")

    @app.post("/v1/workers/{name}/unload")
    def unload(name: str, authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
        return residency_call(agent, name, authorization, "unload")

    @app.get("/v1/workers/{name}/residency")
    def residency(name: str, authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
        return residency_call(agent, name, authorization, "state")

    @app.post("/v1/workers/{name}/restart")
    def restart(name: str, authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
        """Restart a running worker's container (the console's restart, controller/console/actions.py)."""
        refused = refusal(agent, authorization)
        if refused is not None:
            return refused
        try:
            if agent.residency is None:
                raise ResidencyError(503, "this agent has no container engine to restart workers with")
            worker = next((w for w in agent.workers if w.name == name), None)
            if worker is None:
                known = ", ".join(w.name for w in agent.workers) or "none"
                raise ResidencyError(404, f"no worker {name!r} on host {agent.host.name}; its workers: {known}")
            try:
                return JSONResponse(agent.residency.restart(worker))
            finally:
                agent.forget()
        except ResidencyError as exc:
            return JSONResponse({"worker": name, "detail": exc.message}, status_code=exc.status)

    return app


def main(argv: list[str] | None = None) -> None:
    """Run the agent on the host's address and agent port, reading the real NVML.

    Test seam: when the environment variable ``FLEET_AGENT_NVML`` is set to
    ``<module>:<callable>``, that callable (called with no arguments) returns
    the `Nvml` implementation the agent reads instead of the real NVML, e.g.
    ``FLEET_AGENT_NVML=tests.doubles.nvml:scenario_nvml`` on a machine
    without a GPU. Unset (the normal case), the agent uses NVML through nvidia-ml-py.
    """
    import importlib

    import uvicorn

    parser = argparse.ArgumentParser(prog="fleet-agent", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--host-name", required=True, help="this host's name in the spec")
    parser.add_argument("--host", help="address to listen on (default: the host's address in the spec)")
    parser.add_argument("--port", type=int, help="port to listen on (default: the host's agent_port)")
    parser.add_argument("--state-dir", type=Path, help="a local stack's state folder: its state.json names worker PIDs")
    parser.add_argument(
        "--engine-socket", type=Path, help="Docker Engine API socket (default: $DOCKER_HOST, usual places)"
    )
    parser.add_argument(
        "--worker-key-file",
        type=Path,
        help="the worker secret, the bearer token of the load/unload routes (default: <state-dir>/secrets/worker.key, "
        "/run/secrets/worker_key, /etc/fleet/secrets/worker.key)",
    )
    args = parser.parse_args(argv)
    nvml: Nvml | None = None
    seam = os.environ.get("FLEET_AGENT_NVML")
    if seam:
        module, _, name = seam.partition(":")
        try:
            nvml = getattr(importlib.import_module(module), name)()
        except Exception as exc:  # a wrong seam must say so and stop, never fall back to the real NVML
            print(
                f"error: FLEET_AGENT_NVML={seam!r} (<module>:<callable>): {type(exc).__name__}: {exc}", file=sys.stderr
            )
            sys.exit(2)
    try:
        agent = build_agent(
            args.spec,
            args.host_name,
            args.state_dir,
            nvml=nvml,
            container_names=EngineNames(args.engine_socket),
            engine=DockerEngine(args.engine_socket),
            worker_key_file=args.worker_key_file,
        )
    except ControllerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code if exc.exit_code != 1 else 2)
    address = args.host or str(agent.host.address)
    port = args.port or agent.host.agent_port
    uvicorn.run(create_app(agent), host=address, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
