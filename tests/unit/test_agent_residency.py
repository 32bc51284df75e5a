"""The agent's load/unload routes for on-demand workers, with the app's test client, a scripted container engine and a
tiny HTTP server standing in for a worker's health route (the same routes against a real podman engine and the
vLLM and Ollama doubles: tests/contract/test_agent_residency.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from controller.agent.memory import GIB
from controller.agent.residency import EngineError
from controller.agent.service import Agent, ProcessOwners, ProcFs, build_agent, create_app
from controller.plan import Plan, make_plan
from controller.plan.models import Worker
from controller.spec import load_spec
from tests.doubles.nvml import FakeGpu, FakeNvml
from tests.helpers import write_spec
from tests.stubs import free_port_run

HOST = "gpuhost"
UUID0 = "GPU-00000000-0000-4000-8000-0000000000b0"
UUID1 = "GPU-00000000-0000-4000-8000-0000000000b1"
KEY = "test-worker-secret"
ROUTES = [("POST", "load"), ("POST", "unload"), ("GET", "residency")]


def fleet(port_base: int) -> dict[str, Any]:
    """Two on-demand models in one swap group (llama.cpp, vLLM) and two that are always there (vLLM on a GPU, and a CPU
    llama.cpp)."""
    tiny_arch = {"layers": 2, "kv_heads": 2, "head_dim": 16, "params_b": 0.001}
    return {
        "version": 1,
        "name": "residency-test",
        "mesh": {"kind": "none"},
        "hosts": [
            {
                "name": HOST,
                "address": "127.0.0.1",
                "gpus": [
                    {"uuid": UUID0, "name": "NVIDIA GeForce RTX 4090", "vram_gib": 24},
                    {"uuid": UUID1, "name": "NVIDIA GeForce RTX 4090", "vram_gib": 24},
                ],
                "cpu_workers": 1,
                "worker_port_base": port_base,
            }
        ],
        "models": [
            {
                "name": "od-llama",
                "backend": "llamacpp",
                "source": {"gguf": "/m/t.gguf"},
                "context": 512,
                "arch": tiny_arch,
                "swap": {"group": "shared"},
            },
            {
                "name": "od-vllm",
                "backend": "vllm",
                "source": {"huggingface": "org/small"},
                "arch": {"layers": 2, "kv_heads": 1, "head_dim": 64, "params_b": 0.1},
                "context": 2048,
                "options": {"enable-sleep-mode": True},
                "swap": {"group": "shared"},
            },
            {
                "name": "od-vllm-stop",
                "backend": "vllm",
                "source": {"huggingface": "org/small"},
                "arch": {"layers": 2, "kv_heads": 1, "head_dim": 64, "params_b": 0.1},
                "context": 2048,
                "swap": {"group": "shared", "unload": "stop"},
            },
            {
                "name": "steady",
                "backend": "vllm",
                "source": {"huggingface": "org/steady"},
                "arch": {"layers": 2, "kv_heads": 1, "head_dim": 64, "params_b": 0.1},
                "context": 2048,
                "placement": [{"host": HOST, "gpus": [1]}],  # vLLM books most of a GPU: not the swap group's
            },
            {
                "name": "fixed",
                "backend": "llamacpp",
                "device": "cpu",
                "source": {"gguf": "/m/t.gguf"},
                "context": 512,
                "arch": tiny_arch,
            },
        ],
        "swap_groups": [{"name": "shared", "host": HOST, "gpus": [0]}],
        "gateway": {"host": HOST, "public_name": "localhost", "tls": {"mode": "internal"}, "ports": {"https": 8443}},
        "users": [{"name": "me", "models": ["*"]}],
    }


# -- a scripted container engine and a worker's health route ----------------------


class HealthServer:
    """Answers GET ``path`` on 127.0.0.1:``port``: 503 for the first ``loading`` requests (a model loading), then 200."""

    def __init__(self, port: int, path: str = "/health", loading: int = 0) -> None:
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                ok = self.path == path and server.hits > loading
                body = b'{"status": "ok"}' if ok else b'{"error": "Loading model"}'
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@dataclass
class FakeEngine:
    """The `Engine` seam: containers by name with the engine's state names; ``on_start``/``on_stop`` run the worker."""

    containers: dict[str, str] = field(default_factory=dict)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    on_start: dict[str, Callable[[], None]] = field(default_factory=dict)
    on_stop: dict[str, Callable[[], None]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def status(self, name: str, /) -> str | None:
        return self.containers.get(name)

    def start(self, name: str, /) -> None:
        with self.lock:
            if name not in self.containers:
                raise EngineError(f"starting container {name}: no such container")
            self.calls.append(("start", name))
            self.containers[name] = "running"
        self.on_start.get(name, lambda: None)()

    def stop(self, name: str, timeout_s: float, /) -> None:
        self.calls.append(("stop", name, timeout_s))
        self.on_stop.get(name, lambda: None)()
        self.containers[name] = "exited"

    def close(self) -> None:
        pass


@dataclass
class Setup:
    spec: Path
    plan: Plan
    tmp: Path
    engine: FakeEngine
    gpus: list[FakeGpu]
    servers: list[HealthServer] = field(default_factory=list)

    def worker(self, model: str) -> Worker:
        (worker,) = self.plan.workers_of(model)
        return worker

    def agent(self, key: str | None = KEY, **options: Any) -> Agent:
        key_file = self.tmp / "worker.key"
        if key is not None:
            key_file.write_text(key + "\n")
        agent = build_agent(
            self.spec,
            HOST,
            None,
            nvml=FakeNvml(self.gpus),
            container_names=lambda _: None,
            engine=self.engine,
            worker_key_file=key_file,
            max_age_s=0.0,
            **options,
        )
        assert agent.residency is not None
        agent.residency.poll_s = 0.02
        return agent

    def client(self, agent: Agent | None = None) -> TestClient:
        return TestClient(create_app(agent or self.agent()))

    def serve(self, worker: Worker, loading: int = 0) -> HealthServer:
        server = HealthServer(worker.port, loading=loading)
        self.servers.append(server)
        return server

    def container(self, worker: Worker, state: str = "created", loading: int = 0) -> str:
        """The worker's container, in ``state``; started, it serves its health route (503 ``loading`` times first)."""
        name = f"fleet-{worker.name}"
        self.engine.containers[name] = state
        running: list[HealthServer] = []

        def start() -> None:
            running.append(self.serve(worker, loading))

        def stop() -> None:
            while running:
                server = running.pop()
                server.close()
                self.servers.remove(server)

        self.engine.on_start[name] = start
        self.engine.on_stop[name] = stop
        if state == "running":
            start()
        return name

    def own(self, worker: Worker, pid: int, uuid: str, used: int | None) -> None:
        """A GPU process of the worker's container: NVML shows it on ``uuid``, its cgroup names the container."""
        proc = self.tmp / "proc" / str(pid)
        proc.mkdir(parents=True, exist_ok=True)
        (proc / "cgroup").write_text(f"0::/system.slice/fleet-{worker.name}.service/libpod-payload-{'ab' * 32}\n")
        gpu = next(g for g in self.gpus if g.uuid == uuid)
        gpu.processes = [*gpu.processes, (pid, used)]

    def owners(self) -> ProcessOwners:
        return ProcessOwners([w.name for w in self.plan.workers], None, None, ProcFs(self.tmp / "proc"))


@contextmanager
def made_setup(tmp_path: Path) -> Iterator[Setup]:
    spec = write_spec(tmp_path / "fleet.yaml", fleet(free_port_run(8)))
    gpus = [FakeGpu(uuid=UUID0), FakeGpu(uuid=UUID1)]
    made = Setup(spec, make_plan(load_spec(spec)), tmp_path, FakeEngine(), gpus)
    try:
        yield made
    finally:
        for server in made.servers:
            server.close()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    with made_setup(tmp_path) as made:
        yield made


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def call(client: TestClient, method: str, worker: str, action: str, **kwargs: Any) -> Any:
    return client.request(method, f"/v1/workers/{worker}/{action}", **kwargs)


# -- who may ask ----------------------------------------------------------------------


@pytest.mark.parametrize(("method", "action"), ROUTES)
def test_the_routes_need_the_worker_secret(setup: Setup, method: str, action: str) -> None:
    worker = setup.worker("od-llama")
    setup.container(worker)
    with setup.client() as client:
        for headers in ({}, auth("wrong"), {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}, auth("")):
            answer = call(client, method, worker.name, action, headers=headers)
            assert answer.status_code == 401, (headers, answer.text)
            assert answer.headers["www-authenticate"] == "Bearer"
            assert answer.json() == {"detail": "a bearer token, the worker secret, is required"}
        assert call(client, method, "no-such-worker", action).status_code == 401  # no names to anyone unknown
    assert setup.engine.calls == []  # nothing was started or stopped


def test_without_a_worker_secret_the_routes_are_off(setup: Setup) -> None:
    worker = setup.worker("od-llama")
    setup.container(worker)
    with setup.client(setup.agent(key=None)) as client:
        for method, action in ROUTES:
            answer = call(client, method, worker.name, action, headers=auth())
            assert answer.status_code == 503 and "no worker secret" in answer.json()["detail"]
        assert client.get("/healthz").status_code == 200  # the rest of the agent needs none


def test_only_the_on_demand_workers_of_this_host(setup: Setup) -> None:
    fixed = setup.worker("fixed")
    with setup.client() as client:
        for method, action in ROUTES:
            refused = call(client, method, fixed.name, action, headers=auth())
            assert refused.status_code == 409
            assert refused.json() == {
                "worker": fixed.name,
                "detail": f"worker {fixed.name} is not an on-demand worker (its model fixed has no `swap`)",
            }
            unknown = call(client, method, "elsewhere-gpu0", action, headers=auth())
            assert unknown.status_code == 404 and "no worker 'elsewhere-gpu0' on host gpuhost" in unknown.text
    assert setup.engine.calls == []


# -- llama.cpp: start and stop the container --------------------------------------------


def test_a_llamacpp_load_starts_its_container_and_waits_for_health(setup: Setup) -> None:
    worker = setup.worker("od-llama")
    name = setup.container(worker, "exited", loading=3)
    agent = setup.agent()
    agent.owners = setup.owners()
    serve = setup.engine.on_start[name]

    def start() -> None:  # the container serves, and its process takes half again its booking on its GPU
        serve()
        setup.own(worker, 4301, worker.gpus[0].uuid, int(worker.footprint_gib * 1.5 * GIB))

    setup.engine.on_start[name] = start
    with setup.client(agent) as client:
        assert call(client, "GET", worker.name, "residency", headers=auth()).json()["state"] == "unloaded"
        loaded = call(client, "POST", worker.name, "load", headers=auth())
        assert loaded.status_code == 200, loaded.text
        body = loaded.json()
        assert setup.servers[0].hits >= 4  # three 503s while "loading", then the 200 the load waited for
        assert setup.engine.calls == [("start", name)]
        assert (
            body["worker"] == worker.name
            and body["state"] == "resident"
            and body["done"] == f"started container {name}"
        )
        assert 0 < body["load_s"] < 10
        assert body["estimate_gib"] == round(worker.footprint_gib, 2)
        assert body["measured_gib"] == round(worker.footprint_gib * 1.5, 2)
        assert body["memory_warning"].startswith(f"worker {worker.name} took ")
        assert body["memory_warning"].endswith("(+50 %)")
        state = call(client, "GET", worker.name, "residency", headers=auth()).json()
        assert state["state"] == "resident" and state["container"] == "running" and state["healthy"] is True
        assert state["measured_gib"] == body["measured_gib"] and state["estimate_gib"] == body["estimate_gib"]
        again = call(client, "POST", worker.name, "load", headers=auth())  # resident already: nothing to do
        assert again.status_code == 200 and again.json()["done"] == "already running"
    assert setup.engine.calls == [("start", name)]


def test_a_llamacpp_unload_stops_its_container(setup: Setup) -> None:
    worker = setup.worker("od-llama")
    name = setup.container(worker, "running")
    with setup.client() as client:
        assert call(client, "GET", worker.name, "residency", headers=auth()).json()["state"] == "resident"
        unloaded = call(client, "POST", worker.name, "unload", headers=auth())
        assert unloaded.status_code == 200, unloaded.text
        assert unloaded.json()["state"] == "unloaded" and unloaded.json()["done"] == f"stopped container {name}"
        assert setup.engine.calls == [("stop", name, 30)]  # SIGTERM, then the rendered containers' 30 s
        state = call(client, "GET", worker.name, "residency", headers=auth()).json()
        assert state["state"] == "unloaded" and state["container"] == "exited" and state["healthy"] is False
        again = call(client, "POST", worker.name, "unload", headers=auth())
        assert again.status_code == 200 and again.json()["done"] == f"container {name} was not running (exited)"
    assert setup.engine.calls == [("stop", name, 30)]


def test_a_container_running_but_not_healthy_yet_is_starting(setup: Setup) -> None:
    worker = setup.worker("od-llama")
    setup.container(worker, "running", loading=10_000)
    with setup.client() as client:
        state = call(client, "GET", worker.name, "residency", headers=auth()).json()
    assert state["state"] == "starting" and state["container"] == "running"


def test_a_container_that_exits_while_loading_fails_the_load(setup: Setup) -> None:
    worker = setup.worker("od-llama")
    name = setup.container(worker, "created")
    setup.engine.on_start[name] = lambda: setup.engine.containers.__setitem__(name, "exited")
    with setup.client() as client:
        failed = call(client, "POST", worker.name, "load", headers=auth())
    assert failed.status_code == 500
    assert (
        failed.json()["detail"]
        == f"container {name} is exited instead of serving; see `podman logs {name}` (or docker's)"
    )


def test_a_load_that_times_out_stops_the_container_again(setup: Setup) -> None:
    worker = setup.worker("od-llama")
    name = setup.container(worker, "created", loading=10_000)  # never healthy
    agent = setup.agent()
    assert agent.residency is not None
    agent.residency.load_timeout_s = 0.5
    with setup.client(agent) as client:
        failed = call(client, "POST", worker.name, "load", headers=auth())
        assert failed.status_code == 500
        assert failed.json()["detail"] == (
            f"worker {worker.name} not healthy at http://127.0.0.1:{worker.port}/health within 0.5 s; "
            f"container {name} stopped again"
        )
        assert setup.engine.calls == [("start", name), ("stop", name, 30)]
        assert call(client, "GET", worker.name, "residency", headers=auth()).json()["state"] == "unloaded"


def test_a_worker_with_no_container_cannot_load(setup: Setup) -> None:
    worker = setup.worker("od-llama")
    with setup.client() as client:
        for action in ("load", "unload"):
            refused = call(client, "POST", worker.name, action, headers=auth())
            assert refused.status_code == 409
            assert (
                refused.json()["detail"]
                == f"no container fleet-{worker.name} on this host's engine: deploy the fleet first"
            )


def test_an_engine_that_fails_is_a_500_that_says_so(setup: Setup) -> None:
    worker = setup.worker("od-llama")

    def broken(name: str, /) -> str | None:
        raise EngineError(f"looking up container {name}: the engine at unix:///x did not answer: ConnectionError")

    setup.engine.status = broken  # type: ignore[method-assign]
    with setup.client() as client:
        failed = call(client, "POST", worker.name, "load", headers=auth())
        state = call(client, "GET", worker.name, "residency", headers=auth()).json()
    assert failed.status_code == 500 and "did not answer: ConnectionError" in failed.json()["detail"]
    assert state["state"] == "unloaded" and "did not answer" in state["engine_error"]


def test_two_loads_at_once_start_the_container_once(setup: Setup) -> None:
    worker = setup.worker("od-llama")
    name = setup.container(worker, "created", loading=5)
    agent = setup.agent()
    with setup.client(agent) as client:
        answers: list[int] = []

        def load() -> None:
            answers.append(call(client, "POST", worker.name, "load", headers=auth()).status_code)

        threads = [threading.Thread(target=load) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert answers == [200, 200]
    assert setup.engine.calls == [("start", name)]


# -- vLLM: the first load starts the container -------------------------------------------


def test_a_vllm_first_load_starts_its_container(setup: Setup) -> None:
    """A stopped vLLM container is started (it comes up awake); sleeping and waking are in the contract tests, against
    the vLLM double."""
    worker = setup.worker("od-vllm")
    name = setup.container(worker, "created", loading=2)
    with setup.client() as client:
        loaded = call(client, "POST", worker.name, "load", headers=auth())
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["done"] == f"started container {name}" and setup.engine.calls == [("start", name)]


def test_a_vllm_worker_that_unloads_by_stopping_is_started_and_stopped(setup: Setup) -> None:
    """`swap.unload: stop`: no sleep routes asked (its worker runs without development mode), its container
    started to load and stopped to unload, as llama.cpp's."""
    worker = setup.worker("od-vllm-stop")
    assert worker.asleep_gib == 0 and worker.estimate.sleep_residue_gib is None
    name = setup.container(worker, "exited", loading=2)
    with setup.client() as client:
        loaded = call(client, "POST", worker.name, "load", headers=auth())
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["done"] == f"started container {name}" and loaded.json()["state"] == "resident"
        again = call(client, "POST", worker.name, "load", headers=auth())
        assert again.status_code == 200 and again.json()["done"] == "already running"
        unloaded = call(client, "POST", worker.name, "unload", headers=auth())
        assert unloaded.status_code == 200, unloaded.text
        assert unloaded.json()["state"] == "unloaded" and unloaded.json()["done"] == f"stopped container {name}"
        assert call(client, "GET", worker.name, "residency", headers=auth()).json()["state"] == "unloaded"
    assert setup.engine.calls == [("start", name), ("stop", name, 30)]


def test_a_vllm_worker_neither_running_nor_in_a_container_cannot_load(setup: Setup) -> None:
    worker = setup.worker("od-vllm")
    with setup.client() as client:
        refused = call(client, "POST", worker.name, "load", headers=auth())
        assert refused.status_code == 409
        assert refused.json()["detail"] == (
            f"vLLM worker {worker.name} does not answer at http://127.0.0.1:{worker.port}, and this host's engine has "
            f"no container fleet-{worker.name} to start"
        )
        assert call(client, "GET", worker.name, "residency", headers=auth()).json()["state"] == "unloaded"
        unload = call(client, "POST", worker.name, "unload", headers=auth())  # nothing holds memory: done
        assert unload.status_code == 200 and unload.json()["state"] == "unloaded"


def test_a_running_worker_is_restarted_and_a_stopped_one_is_not(setup: Setup) -> None:
    """The console's restart (controller/console/actions.py): stop and start its container, with the secret."""
    worker = setup.worker("od-llama")
    name = setup.container(worker, "running")
    with setup.client() as client:
        assert call(client, "POST", worker.name, "restart").status_code == 401
        assert setup.engine.calls == []
        restarted = call(client, "POST", worker.name, "restart", headers=auth())
        assert restarted.status_code == 200, restarted.text
        assert restarted.json()["message"] == f"restarted container {name}"
        assert setup.engine.calls == [("stop", name, 30), ("start", name)]
        setup.engine.containers[name] = "exited"
        refused = call(client, "POST", worker.name, "restart", headers=auth())
        assert refused.status_code == 409 and "exited, not running" in refused.json()["detail"]
        assert call(client, "POST", "nope", "restart", headers=auth()).status_code == 404
    assert setup.engine.calls == [("stop", name, 30), ("start", name)]
