"""Making an on-demand worker resident on this host, and taking it out again (the swap coordinator asks).

The swap coordinator on the gateway host decides what to load and unload; on each GPU host the agent does it, for
the workers of its host's plan whose model has `swap`, through each backend's own mechanism:

    backend    load                                             unload
    llama.cpp  start its container, wait until /health is 200   stop its container (SIGTERM, then the timeout)
    vLLM       first load: start its container, as llama.cpp;   sleep at level 1 (`WorkerClient.unload`: refused
               after that: wake up (`WorkerClient.load`)        while requests run; the coordinator drains first)
               with `swap.unload: stop`: as llama.cpp           with `swap.unload: stop`: as llama.cpp
    Ollama     `WorkerClient.load` (keep_alive -1)              `WorkerClient.unload` (keep_alive 0)

Containers are the plan's (`fleet-<worker>`, controller/render/containers.py), reached through the Docker Engine
API with the `docker` SDK (Docker, or podman's compatible socket), as the agent's container lookups are. A load
is bounded by LOAD_TIMEOUT_S (controller/backends/client.py): a worker not healthy by then is stopped again (its
container: it must not hold GPU memory the coordinator thinks is free) and the load fails.

States (`state`): resident (serving, weights on the GPU), sleeping (vLLM asleep: weights in CPU memory), starting
(its container runs, its health route does not answer 200 yet), unloaded (not running, or Ollama's model not
loaded).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import docker
import docker.constants
import docker.errors
import httpx
import requests

from controller import backends
from controller.backends.client import LOAD_TIMEOUT_S, SLEEP_MODE_HINT, WorkerClient
from controller.backends.vllm import VLLM
from controller.errors import BackendError
from controller.plan.models import Worker
from controller.spec.models import Model

RESIDENT, SLEEPING, STARTING, UNLOADED = "resident", "sleeping", "starting", "unloaded"
STOP_TIMEOUT_S = 30  # as the rendered containers' stop timeout (controller/render/containers.py)
ENGINE_TIMEOUT_S = 60.0  # one engine API call (start, inspect); a stop waits its timeout on top
HTTP_TIMEOUT_S = 5.0  # one call to a worker, but a load's or a sleep's own (LOAD_TIMEOUT_S)
POLL_S = 0.25  # how often a load asks whether the worker is healthy yet
T = TypeVar("T")


class ResidencyError(Exception):
    """A load or unload that could not be done; ``status`` is the HTTP status the agent answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- the container engine ---------------------------------------------------------


class EngineError(Exception):
    """The container engine could not be asked, or refused."""


class Engine(Protocol):
    """The few container operations residency needs, by container name."""

    def status(self, name: str, /) -> str | None:
        """The container's state as the engine names it (created, running, paused, exited, …); None: no such one."""
        ...

    def start(self, name: str, /) -> None: ...

    def stop(self, name: str, timeout_s: float, /) -> None:
        """SIGTERM (the image's stop signal), then SIGKILL after ``timeout_s``."""
        ...

    def close(self) -> None: ...


def listening(path: Path, timeout_s: float) -> bool:
    """Whether a connection to the Unix socket ``path`` is accepted (a stale socket refuses at once).

    Asked before a new client connects, because docker 7.1.0 leaves the socket of a refused connect for the
    garbage collector to close, with a ResourceWarning (transport/unixconn.py; docker/docker-py#3356): so a
    dead engine costs no socket per lookup, only the one refusal a connected client meets when it dies. Not
    asked on every lookup: podman logs a warning for each connection closed without a request.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def engine_socket() -> Path | None:
    """The Docker Engine API socket: $DOCKER_HOST if it is unix://, else Docker's or podman's usual place."""
    host = os.environ.get("DOCKER_HOST", "")
    candidates = [Path(host.removeprefix("unix://"))] if host.startswith("unix://") else []
    candidates += [Path("/var/run/docker.sock"), Path("/run/podman/podman.sock")]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        candidates.append(Path(runtime) / "podman" / "podman.sock")
    return next((p for p in candidates if p.is_socket()), None)


def api_version(url: str, timeout_s: float) -> str:
    """The engine's API version, from the API-Version header of ``GET /_ping`` (as the Docker CLI learns it).

    Not the SDK's ``version="auto"``, which asks ``GET /version``: podman answers that only after probing
    its host (0.4 s on an idle machine here, past a second on a busy one), so lookups would time out.
    No fixed version would do: podman 4.3 names 1.41, and Docker 29.0 refuses anything below 1.44.
    """
    probe = docker.APIClient(base_url=url, version=docker.constants.MINIMUM_DOCKER_API_VERSION, timeout=timeout_s)
    try:
        response = probe.get(f"{probe.base_url}/_ping", timeout=timeout_s)  # a Session's get: no default
        response.raise_for_status()
        version = response.headers.get("API-Version")
    finally:
        probe.close()
    if not version:
        raise docker.errors.DockerException(f"{url}: GET /_ping named no API-Version")
    return str(version)


class DockerEngine:
    """`Engine` over the Docker Engine API through the `docker` SDK; every failure is an EngineError that says
    where. After a failure that is not the engine's own answer the client is dropped (the engine may have
    restarted, with another API version) and the next call connects again. Calls come under the caller's lock."""

    def __init__(self, socket: Path | None = None, timeout_s: float = ENGINE_TIMEOUT_S) -> None:
        self.socket = socket
        self.timeout_s = timeout_s
        self._client: docker.DockerClient | None = None
        self._client_socket: Path | None = None
        self._lock = threading.Lock()

    def status(self, name: str, /) -> str | None:
        def ask(client: docker.DockerClient) -> str | None:
            try:
                container = client.containers.get(name)
            except docker.errors.NotFound:
                return None
            return str(container.status)

        return self._call(f"looking up container {name}", ask)

    def start(self, name: str, /) -> None:
        self._call(f"starting container {name}", lambda client: client.containers.get(name).start())

    def stop(self, name: str, timeout_s: float, /) -> None:
        seconds = math.ceil(timeout_s)  # the API's `t` is whole seconds
        self._call(f"stopping container {name}", lambda client: client.containers.get(name).stop(timeout=seconds))

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _call(self, what: str, call: Callable[[docker.DockerClient], T]) -> T:
        with self._lock:
            socket_path = self.socket or engine_socket()
            if socket_path is None or not socket_path.is_socket():
                raise EngineError(
                    f"{what}: no container engine API socket (the agent's --engine-socket, $DOCKER_HOST, "
                    "/var/run/docker.sock, /run/podman/podman.sock)"
                )
            url = f"unix://{socket_path}"
            if self._client_socket != socket_path:
                self._drop()
            if self._client is None and not listening(socket_path, min(self.timeout_s, 5.0)):
                raise EngineError(f"{what}: no container engine answers at {url}")
            try:
                if self._client is None:
                    self._client = docker.DockerClient(
                        base_url=url, version=api_version(url, self.timeout_s), timeout=self.timeout_s
                    )
                    self._client_socket = socket_path
                return call(self._client)
            except docker.errors.APIError as exc:  # the engine answered: the client is fine
                raise EngineError(f"{what}: the engine at {url} answered: {exc.explanation or exc}") from None
            except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
                self._drop()
                raise EngineError(f"{what}: the engine at {url} did not answer: {type(exc).__name__}: {exc}") from None

    def _drop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
        self._client = self._client_socket = None


# -- residency --------------------------------------------------------------------


def base_url(worker: Worker) -> str:
    host = f"[{worker.address}]" if ":" in worker.address else worker.address
    return f"http://{host}:{worker.port}"


def container_name(worker: Worker) -> str:
    return f"fleet-{worker.name}"


class Residency:
    """Load, unload and ask the state of this host's on-demand workers. One operation per worker at a time."""

    def __init__(
        self,
        engine: Engine | None,
        key: Callable[[], str | None] = lambda: None,
        load_timeout_s: float = LOAD_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
        poll_s: float = POLL_S,
    ) -> None:
        self.engine = engine
        self.key = key  # the worker secret, which vLLM and llama.cpp workers (and Ollama's guard) require
        self.load_timeout_s = load_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.poll_s = poll_s
        # The state each worker was last left in by this agent (resident, sleeping, unloaded), so a measurement of a
        # worker put to sleep is not taken for a miss of the estimate (memory.py).
        self.left: dict[str, str] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    # -- the three operations

    def state(self, worker: Worker, model: Model) -> dict[str, Any]:
        with self._lock(worker):
            return self._state(worker, model)

    def load(self, worker: Worker, model: Model) -> dict[str, Any]:
        """Make the worker resident; {"worker", "state": "resident", "load_s", "done"} when it is."""
        with self._lock(worker):
            began = time.monotonic()
            done = self._load(worker, model, began + self.load_timeout_s)
            self.left[worker.name] = RESIDENT
            return {
                "worker": worker.name,
                "state": RESIDENT,
                "load_s": round(time.monotonic() - began, 3),
                "done": done,
            }

    def unload(self, worker: Worker, model: Model) -> dict[str, Any]:
        """Free the GPU memory the worker holds; {"worker", "state": "unloaded"|"sleeping", "unload_s", "done"}."""
        with self._lock(worker):
            began = time.monotonic()
            state, done = self._unload(worker, model)
            self.left[worker.name] = state
            return {"worker": worker.name, "state": state, "unload_s": round(time.monotonic() - began, 3), "done": done}

    def restart(self, worker: Worker) -> dict[str, Any]:
        """Stop and start a running worker's container; one that is not running is refused (an on-demand worker
        is loaded through the swap coordinator instead, which books its memory)."""
        with self._lock(worker):
            name = container_name(worker)
            status = self._status(worker, required=True)
            if status != "running":
                raise ResidencyError(409, f"container {name} is {status}, not running: nothing to restart")
            began = time.monotonic()
            self._engine_do(lambda engine: engine.stop(name, self.stop_timeout_s))
            self._engine_do(lambda engine: engine.start(name))
            return {
                "worker": worker.name,
                "message": f"restarted container {name}",
                "restart_s": round(time.monotonic() - began, 3),
            }

    # -- per backend

    def _load(self, worker: Worker, model: Model, deadline: float) -> str:
        if worker.backend == "ollama":
            with self._client(worker) as client:
                if not client.healthy():
                    raise ResidencyError(409, f"Ollama worker {worker.name} does not answer at {client.base_url}")
                self._backend(lambda: client.load(model), f"loading {model.name} into Ollama worker {worker.name}")
            return f"loaded {model.name} (keep_alive -1)"
        name = container_name(worker)
        restarts = backends.unloads_by_stopping(model)
        status = self._status(worker, required=restarts)
        if status is None:  # vLLM in no container of this engine (a process of its own): it must be running
            with self._client(worker) as client:
                if not client.healthy():
                    raise ResidencyError(
                        409,
                        f"vLLM worker {worker.name} does not answer at {client.base_url}, and this host's engine "
                        f"has no container {name} to start",
                    )
        elif status == "paused":
            raise ResidencyError(409, f"container {name} is paused; unpause it (`podman unpause {name}`)")
        elif status != "running":  # the first load of a vLLM worker, every load of a llama.cpp one
            self._engine_do(lambda engine: engine.start(name))
            self._wait_healthy(worker, deadline, stop_on_failure=True)
            return f"started container {name}"
        else:  # running: it may still be starting, then a vLLM worker may be asleep
            self._wait_healthy(worker, deadline, stop_on_failure=False)
        if restarts:
            return "already running"
        with self._client(worker) as client:
            if not self._vllm_sleeping(client, model):  # None: no development mode, so it cannot be asleep
                return "already awake"
            self._backend(lambda: client.load(model), f"waking vLLM worker {worker.name}")
        return "woke up"

    def _unload(self, worker: Worker, model: Model) -> tuple[str, str]:
        if worker.backend == "ollama":
            with self._client(worker) as client:
                self._backend(lambda: client.unload(model), f"unloading {model.name} from Ollama worker {worker.name}")
            return UNLOADED, f"unloaded {model.name} (keep_alive 0)"
        name = container_name(worker)
        restarts = backends.unloads_by_stopping(model)
        status = self._status(worker, required=restarts)
        if restarts:
            if status != "running":
                return UNLOADED, f"container {name} was not running ({status})"
            self._engine_do(lambda engine: engine.stop(name, self.stop_timeout_s))
            return UNLOADED, f"stopped container {name}"
        # vLLM: put it to sleep, weights to CPU memory (fast to wake).
        with self._client(worker) as client:
            if status not in (None, "running") or (status is None and not client.healthy()):
                return UNLOADED, f"not running (container {name}: {status or 'none'})"
            if not VLLM.sleep_mode(model):
                raise ResidencyError(
                    409,
                    f"vLLM worker {worker.name}: without --enable-sleep-mode a sleep frees no GPU memory; "
                    f"{SLEEP_MODE_HINT}",
                )
            sleeping = self._vllm_sleeping(client, model)
            if sleeping is None:
                raise ResidencyError(
                    409,
                    f"vLLM worker {worker.name} has no sleep routes: it has sleep mode only in its development "
                    f"mode; {SLEEP_MODE_HINT}",
                )
            if sleeping:
                return SLEEPING, "already asleep"
            try:
                busy = client.queue_depth()
            except BackendError as exc:
                raise ResidencyError(500, f"vLLM worker {worker.name}: cannot tell whether it is idle: {exc}") from None
            if busy:
                raise ResidencyError(
                    409,
                    f"vLLM worker {worker.name} has requests running or waiting ({busy:g}): drain it first "
                    "(a sleep with requests in flight kills vLLM's engine)",
                )
            self._backend(lambda: client.unload(model), f"putting vLLM worker {worker.name} to sleep")
        return SLEEPING, "asleep (level 1: weights in CPU memory)"

    def _state(self, worker: Worker, model: Model) -> dict[str, Any]:
        out: dict[str, Any] = {"worker": worker.name, "model": model.name, "backend": worker.backend}
        status: str | None = None
        if worker.backend != "ollama":
            try:
                status = self._status(worker, required=False)
            except ResidencyError as exc:
                out["engine_error"] = exc.message
            out["container"] = status
        with self._client(worker) as client:
            healthy = client.healthy()
            out["healthy"] = healthy
            if worker.backend == "ollama":
                if not healthy:
                    return {**out, "state": UNLOADED, "reason": f"Ollama does not answer at {client.base_url}"}
                try:
                    loaded = client.loaded(model)
                except BackendError as exc:
                    return {**out, "state": UNLOADED, "reason": str(exc)}
                return {**out, "state": RESIDENT if loaded else UNLOADED}
            if status is not None and status != "running":
                return {**out, "state": UNLOADED, "reason": f"container {container_name(worker)} is {status}"}
            if not healthy:
                if status == "running":
                    return {**out, "state": STARTING, "reason": "its container runs; its health route is not 200 yet"}
                return {**out, "state": UNLOADED, "reason": "not running"}
            if worker.backend == "vllm" and self._vllm_sleeping(client, model, strict=False):
                return {**out, "state": SLEEPING}
            return {**out, "state": RESIDENT}

    # -- helpers

    def _lock(self, worker: Worker) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(worker.name, threading.Lock())

    def _client(self, worker: Worker) -> WorkerClient:
        return WorkerClient(worker.backend, base_url(worker), timeout=HTTP_TIMEOUT_S, key=self.key())

    def _status(self, worker: Worker, required: bool) -> str | None:
        """Its container's state; None when the engine has none (required: a 409) or, not required, has no engine."""
        name = container_name(worker)
        if self.engine is None:
            if required:
                raise ResidencyError(409, f"worker {worker.name} runs in container {name}, but the agent has no engine")
            return None
        try:
            status = self.engine.status(name)
        except EngineError as exc:
            raise ResidencyError(500, str(exc)) from None
        if status is None and required:
            raise ResidencyError(409, f"no container {name} on this host's engine: deploy the fleet first")
        return status

    def _engine_do(self, call: Callable[[Engine], None]) -> None:
        assert self.engine is not None  # _status(required) or a container's status came before
        try:
            call(self.engine)
        except EngineError as exc:
            raise ResidencyError(500, str(exc)) from None

    def _wait_healthy(self, worker: Worker, deadline: float, stop_on_failure: bool) -> None:
        """Until its health route is 200; fails (stopping it again when asked) when its container stops or time is up."""
        name = container_name(worker)
        url = base_url(worker) + backends.get(worker.backend).health_path
        with httpx.Client(timeout=HTTP_TIMEOUT_S, trust_env=False) as http:
            while True:
                try:
                    if http.get(url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                status = self._status(worker, required=False)
                if status is not None and status != "running":
                    raise ResidencyError(
                        500, f"container {name} is {status} instead of serving; see `podman logs {name}` (or docker's)"
                    )
                if time.monotonic() >= deadline:
                    break
                time.sleep(self.poll_s)
        if stop_on_failure and self.engine is not None:
            with contextlib.suppress(EngineError):  # best effort: the error below says what matters
                self.engine.stop(name, self.stop_timeout_s)
        raise ResidencyError(
            500,
            f"worker {worker.name} not healthy at {url} within {self.load_timeout_s:g} s"
            + (f"; container {name} stopped again" if stop_on_failure else ""),
        )

    def _vllm_sleeping(self, client: WorkerClient, model: Model, strict: bool = True) -> bool | None:
        """Whether vLLM sleeps; None when it has no sleep routes (no development mode: it never sleeps). Another
        failure is an error, or (not ``strict``) None too."""
        try:
            return not client.loaded(model)
        except BackendError as exc:
            if strict and "(404)" not in str(exc):
                raise ResidencyError(500, f"vLLM worker at {client.base_url}: {exc}") from None
            return None

    @staticmethod
    def _backend(call: Callable[[], None], what: str) -> None:
        try:
            call()
        except BackendError as exc:
            raise ResidencyError(500, f"{what} failed: {exc}") from None
