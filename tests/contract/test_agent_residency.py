"""The agent's load/unload routes for on-demand workers, the agent running as on a host (`fleet-agent`'s main, its
own process) against real workers:

- llama.cpp: the real llama-server with the tiny GGUF in a container of a real podman API service
  (tests/podman_service.py; the llama.cpp stand-in image of tests/images.py, built in about a second), which the
  agent starts and stops through the engine API (the `docker` SDK); the agent finds the container's process by its
  cgroup and the engine, as NVML (the double, tests/doubles/nvml.py, through the agent's FLEET_AGENT_NVML seam)
  shows it on a GPU, and compares its memory with the plan's estimate;
- vLLM and Ollama: `vllm serve` (VLLM_SERVER_DEV_MODE=1, --enable-sleep-mode) and `ollama serve`, the real programs
  where installed, else the doubles (tests/doubles/vllm.py, ollama.py), as processes on the workers' planned ports.

The container is made as the plan's is named (`fleet-<worker>`) but on the host's network, so the agent (on the host
here) reaches it on the worker's planned port, as it reaches a published port on a GPU host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.agent.memory import GIB
from controller.backends.client import WorkerClient
from controller.local.processes import base_env
from controller.plan import Plan, make_plan
from controller.plan.models import Worker
from controller.spec import load_spec
from tests.conftest import ROOT, need_tool
from tests.contract.test_backends import program
from tests.doubles.common import PACE_ENV
from tests.doubles.nvml import SCENARIO_ENV, FakeGpu, write_scenario
from tests.helpers import write_spec
from tests.images import build_stand_in, llamacpp_stand_in
from tests.llama import tiny_model
from tests.podman_service import PodmanService, running_podman
from tests.stubs import free_port_run, free_ports, wait_until

pytestmark = pytest.mark.contract
HOST = "gpuhost"
UUIDS = ["GPU-00000000-0000-4000-8000-0000000000c0", "GPU-00000000-0000-4000-8000-0000000000c1"]
KEY = "contract-worker-secret"
IMAGE = "localhost/fleet-test-llamacpp:residency"
VLLM_MODEL = os.environ.get("FLEET_VLLM_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")
OLLAMA_TAG = "qwen2.5:0.5b"


def fleet(port_base: int, agent_port: int) -> dict[str, Any]:
    arch = {"layers": 24, "kv_heads": 2, "head_dim": 64, "params_b": 0.5}
    return {
        "version": 1,
        "name": "residency-contract",
        "mesh": {"kind": "none"},
        "hosts": [
            {
                "name": HOST,
                "address": "127.0.0.1",
                "agent_port": agent_port,
                "gpus": [{"uuid": u, "name": "NVIDIA GeForce RTX 4090", "vram_gib": 24} for u in UUIDS],
                "worker_port_base": port_base,
            }
        ],
        "models": [
            {
                "name": "od-llama",
                "backend": "llamacpp",
                "source": {"gguf": "tiny.gguf"},
                "context": 512,
                "arch": {"layers": 2, "kv_heads": 4, "head_dim": 16, "params_b": 0.0005},
                "swap": {"group": "shared"},
            },
            {
                "name": "od-vllm",
                "backend": "vllm",
                "source": {"huggingface": VLLM_MODEL},
                "context": 2048,
                "arch": arch,
                "options": {"enable-sleep-mode": True},
                "swap": {"group": "shared", "ttl": "10m"},
            },
            {
                "name": "od-ollama",
                "backend": "ollama",
                "source": {"ollama": OLLAMA_TAG},
                "context": 2048,
                "arch": arch,
                "swap": {"group": "shared"},
            },
        ],
        "swap_groups": [{"name": "shared", "host": HOST}],
        "gateway": {"host": HOST, "public_name": "localhost", "tls": {"mode": "internal"}, "ports": {"https": 8443}},
        "users": [{"name": "me", "models": ["*"]}],
    }


@dataclass
class Stack:
    plan: Plan
    url: str  # the agent
    tmp: Path
    scenario: Path
    podman: PodmanService
    agent_log: Path

    def worker(self, model: str) -> Worker:
        (worker,) = self.plan.workers_of(model)
        return worker

    def call(self, method: str, worker: Worker | str, action: str, key: str | None = KEY) -> httpx.Response:
        name = worker if isinstance(worker, str) else worker.name
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return httpx.request(
            method, f"{self.url}/v1/workers/{name}/{action}", headers=headers, timeout=120, trust_env=False
        )

    def ok(self, method: str, worker: Worker, action: str) -> dict[str, Any]:
        answer = self.call(method, worker, action)
        assert answer.status_code == 200, f"{answer.status_code} {answer.text}\n{self.agent_log.read_text()[-3000:]}"
        body: dict[str, Any] = answer.json()
        return body

    def state(self, worker: Worker) -> str:
        return str(self.ok("GET", worker, "residency")["state"])

    def status_of(self, worker: Worker) -> dict[str, Any]:
        answer = httpx.get(f"{self.url}/status", timeout=30, trust_env=False).json()
        return next(w for w in answer["workers"] if w["name"] == worker.name)

    def gpus(self, processes: dict[str, list[tuple[int, int | None]]]) -> None:
        """What NVML shows: GPU UUID → (PID, bytes) of its compute processes."""
        write_scenario(self.scenario, [FakeGpu(uuid=u, processes=processes.get(u, [])) for u in UUIDS])

    def inspect(self, name: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = json.loads(self.podman.run("inspect", name))
        return found[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    podman_exe = need_tool("podman", "install Debian's podman and runc")
    tmp = tmp_path_factory.mktemp("residency")
    tiny_model(tmp)  # the spec's tiny.gguf, beside it
    port_base = free_port_run(8)
    (agent_port,) = free_ports(1, exclude=range(port_base, port_base + 8))
    spec = write_spec(tmp / "fleet.yaml", fleet(port_base, agent_port))
    plan = make_plan(load_spec(spec))
    (tmp / "worker.key").write_text(KEY + "\n")
    scenario = tmp / "nvml.json"
    with running_podman(podman_exe) as podman:
        build_stand_in(podman.command(), podman.env, IMAGE, llamacpp_stand_in())
        made = Stack(plan, f"http://127.0.0.1:{agent_port}", tmp, scenario, podman, tmp / "agent.log")
        made.gpus({})
        env = base_env() | {
            "FLEET_AGENT_NVML": "tests.doubles.nvml:scenario_nvml",
            SCENARIO_ENV: str(scenario),
            "PYTHONPATH": str(ROOT),
        }
        argv = [sys.executable, "-m", "controller.agent.service", "--spec", str(spec), "--host-name", HOST]
        argv += ["--host", "127.0.0.1", "--port", str(agent_port), "--engine-socket", str(podman.socket)]
        argv += ["--worker-key-file", str(tmp / "worker.key")]
        with made.agent_log.open("wb") as out:
            agent = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:

            def up() -> bool:
                try:
                    return httpx.get(f"{made.url}/healthz", timeout=2, trust_env=False).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(lambda: agent.poll() is not None or up(), 60, "the agent answering")
            assert agent.poll() is None, made.agent_log.read_text()
            yield made
        finally:
            agent.terminate()
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(10)
            podman.run("rm", "--all", "--force", "--time", "0")


def llama_container(stack: Stack, worker: Worker) -> str:
    """The worker's llama.cpp container, created (not started): llama-server with the tiny model and the worker
    secret, on the worker's planned address and port."""
    name = f"fleet-{worker.name}"
    stack.podman.run("rm", "--force", "--time", "0", name)
    args = ["--model", "/models/tiny.gguf", "--host", worker.address, "--port", str(worker.port)]
    args += ["--ctx-size", "512", "--parallel", "1", "--threads", "1", "--no-webui", "--alias", worker.model]
    args += ["--api-key-file", "/run/secrets/worker_key"]
    stack.podman.run(
        "create",
        "--name",
        name,
        "--network",
        "host",
        "--volume",
        f"{stack.tmp}:/models:ro",
        "--volume",
        f"{stack.tmp / 'worker.key'}:/run/secrets/worker_key:ro",
        IMAGE,
        *args,
    )
    return name


def health(worker: Worker, path: str) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{worker.port}{path}", timeout=5, trust_env=False).status_code
    except httpx.HTTPError:
        return None


# -- llama.cpp: a container, started and stopped through podman's engine API ----------------


def test_unauthenticated_calls_are_refused_and_change_nothing(stack: Stack) -> None:
    worker = stack.worker("od-llama")
    name = llama_container(stack, worker)
    for key in (None, "wrong"):
        for method, action in (("POST", "load"), ("POST", "unload"), ("GET", "residency")):
            refused = stack.call(method, worker, action, key=key)
            assert refused.status_code == 401, refused.text
            assert refused.headers["www-authenticate"] == "Bearer"
    assert stack.inspect(name)["State"]["Status"] == "created"  # never started


def test_llamacpp_load_starts_the_container_waits_for_health_and_unload_stops_it(stack: Stack) -> None:
    worker = stack.worker("od-llama")
    name = llama_container(stack, worker)
    before = stack.ok("GET", worker, "residency")
    assert before["state"] == "unloaded" and before["container"] == "created" and before["healthy"] is False

    loaded = stack.ok("POST", worker, "load")
    # The load came back once llama-server's /health was 200, which it is only with the model loaded.
    assert health(worker, "/health") == 200
    assert loaded["worker"] == worker.name and loaded["state"] == "resident"
    assert loaded["done"] == f"started container {name}" and 0 < loaded["load_s"] < 120
    assert loaded["estimate_gib"] == round(worker.footprint_gib, 2)
    assert loaded["measured_gib"] is None  # NVML (the double) shows no process of it yet
    models = httpx.get(
        f"http://127.0.0.1:{worker.port}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    )
    assert models.status_code == 200 and worker.model in models.text  # serving, behind the worker secret
    state = stack.ok("GET", worker, "residency")
    assert state["state"] == "resident" and state["container"] == "running" and state["healthy"] is True

    # NVML shows the container's process on the worker's GPU at 1.5 times its booking: the agent finds it by its
    # cgroup and podman's engine, and warns with both numbers.
    pid = int(stack.inspect(name)["State"]["Pid"])
    uuid = worker.gpus[0].uuid
    took = int(worker.footprint_gib * 1.5 * GIB)
    stack.gpus({uuid: [(pid, took)]})
    wait_until(lambda: stack.status_of(worker)["memory_warning"] is not None, 30, "the memory warning")
    seen = stack.status_of(worker)
    estimate = round(worker.footprint_gib * GIB)
    assert seen["pinning"] == "ok" and seen["processes"] == [{"uuid": uuid, "pid": pid, "memory_bytes": took}]
    assert seen["memory_warning"] == (
        f"worker {worker.name} took {took / GIB:.2f} GiB on {uuid}, the estimate was {estimate / GIB:.2f} GiB (+50 %)"
    )
    metrics = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(httpx.get(f"{stack.url}/metrics", timeout=30).text)
        for s in family.samples
    }
    on_gpu = (("gpu", uuid), ("worker", worker.name))
    assert metrics[("fleet_worker_memory_measured_bytes", on_gpu)] == took
    assert metrics[("fleet_worker_memory_estimate_bytes", on_gpu)] == estimate
    assert metrics[("fleet_worker_memory_estimate_miss_ratio", (("worker", worker.name),))] == pytest.approx(0.5)

    began = time.monotonic()
    unloaded = stack.ok("POST", worker, "unload")
    assert unloaded["state"] == "unloaded" and unloaded["done"] == f"stopped container {name}"
    assert time.monotonic() - began < 25  # llama-server ends on SIGTERM: no waiting out the 30 s for SIGKILL
    container = stack.inspect(name)["State"]
    assert container["Status"] == "exited" and container["ExitCode"] != 137  # not killed
    assert health(worker, "/health") is None  # nothing listens any more
    stack.gpus({})
    after = stack.ok("GET", worker, "residency")
    assert after["state"] == "unloaded" and after["container"] == "exited"

    again = stack.ok("POST", worker, "load")  # the same container starts again: the next swap back
    assert again["state"] == "resident" and health(worker, "/health") == 200
    stack.ok("POST", worker, "unload")


def test_a_worker_with_no_container_is_a_409(stack: Stack) -> None:
    worker = stack.worker("od-llama")
    stack.podman.run("rm", "--force", "--time", "0", f"fleet-{worker.name}")
    refused = stack.call("POST", worker, "load")
    assert refused.status_code == 409
    assert refused.json() == {
        "worker": worker.name,
        "detail": f"no container fleet-{worker.name} on this host's engine: deploy the fleet first",
    }
    assert stack.call("POST", "no-such-worker", "load").status_code == 404


# -- vLLM and Ollama: processes on the planned ports -----------------------------------------


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    return folder


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.terminate()
    for proc in started:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def start_vllm(
    stack: Stack, worker: Worker, exe: str, double: bool, processes: list[subprocess.Popen[bytes]], pace: float
) -> None:
    env = base_env() | {"VLLM_SERVER_DEV_MODE": "1", "VLLM_API_KEY": KEY}
    if double:
        env |= {"CUDA_VISIBLE_DEVICES": ",".join(g.uuid for g in worker.gpus), PACE_ENV: str(pace)}
    argv = [exe, "serve", VLLM_MODEL, "--host", worker.address, "--port", str(worker.port)]
    argv += ["--served-model-name", *worker.served_names, "--max-model-len", "2048", "--enable-sleep-mode"]
    argv += ["--gpu-memory-utilization", "0.3"]
    log = stack.tmp / f"vllm-{worker.port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    processes.append(proc)
    with WorkerClient("vllm", f"http://127.0.0.1:{worker.port}", key=KEY) as client:
        wait_until(lambda: proc.poll() is not None or client.healthy(), 60 if double else 600, "vllm healthy")
    assert proc.poll() is None, log.read_text()


def is_sleeping(worker: Worker) -> bool:
    answer = httpx.get(f"http://127.0.0.1:{worker.port}/is_sleeping", timeout=30, trust_env=False)
    return bool(answer.json()["is_sleeping"])


def chat(worker: Worker, max_tokens: int = 8) -> httpx.Response:
    body = {"model": worker.model, "messages": [{"role": "user", "content": "Count."}], "max_tokens": max_tokens}
    return httpx.post(
        f"http://127.0.0.1:{worker.port}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=300,
        trust_env=False,
    )


def test_vllm_unload_sleeps_and_load_wakes_it(
    stack: Stack, bin_dir: Path, processes: list[subprocess.Popen[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    worker = stack.worker("od-vllm")
    kind = program("vllm", bin_dir, capsys)
    exe = shutil.which("vllm") if kind == "real" else str(bin_dir / "vllm")
    assert exe
    start_vllm(stack, worker, exe, kind == "double", processes, pace=0.01)
    first = stack.ok("GET", worker, "residency")
    assert first["state"] == "resident" and first["container"] is None  # a process: no container of the engine's

    slept = stack.ok("POST", worker, "unload")
    assert slept["state"] == "sleeping" and slept["done"] == "asleep (level 1: weights in CPU memory)"
    assert is_sleeping(worker) and stack.state(worker) == "sleeping"
    assert stack.status_of(worker)["memory"]["compared"] is False  # asleep on purpose: no miss to judge
    assert stack.ok("POST", worker, "unload")["done"] == "already asleep"

    woke = stack.ok("POST", worker, "load")
    assert woke["state"] == "resident" and woke["done"] == "woke up"
    assert not is_sleeping(worker) and stack.state(worker) == "resident"
    assert chat(worker).status_code == 200  # level 1 kept the weights: it answers
    assert stack.ok("POST", worker, "load")["done"] == "already awake"
    assert processes[0].poll() is None


def test_vllm_unload_is_refused_while_requests_run(
    stack: Stack, bin_dir: Path, processes: list[subprocess.Popen[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    """The coordinator drains first; an unload that comes anyway is a 409 and vLLM keeps serving (a sleep then would
    kill its engine)."""
    worker = stack.worker("od-vllm")
    kind = program("vllm", bin_dir, capsys)
    if kind == "real":
        pytest.skip("paces its answers through the vLLM double's seconds-per-token switch")
    start_vllm(stack, worker, str(bin_dir / "vllm"), True, processes, pace=0.1)
    answers: list[int] = []
    long = threading.Thread(target=lambda: answers.append(chat(worker, max_tokens=2000).status_code))
    long.start()
    try:
        with WorkerClient("vllm", f"http://127.0.0.1:{worker.port}", key=KEY) as client:
            wait_until(lambda: (client.queue_depth() or 0) >= 1, 30, "the request in flight")
        refused = stack.call("POST", worker, "unload")
        assert refused.status_code == 409, refused.text
        assert "drain it first" in refused.json()["detail"]
        assert not is_sleeping(worker)
    finally:
        long.join(60)
    assert answers == [200] and processes[0].poll() is None  # it served on, undisturbed
    assert stack.ok("POST", worker, "unload")["state"] == "sleeping"  # drained: now it may sleep


def test_ollama_load_and_unload(
    stack: Stack, bin_dir: Path, processes: list[subprocess.Popen[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    worker = stack.worker("od-ollama")
    model = stack.plan.model(worker.model)
    kind = program("ollama", bin_dir, capsys)
    exe = shutil.which("ollama") if kind == "real" else str(bin_dir / "ollama")
    assert exe
    env = base_env() | {"OLLAMA_HOST": f"{worker.address}:{worker.port}", "OLLAMA_MODELS": str(stack.tmp / "ollama")}
    env.pop("OLLAMA_KEEP_ALIVE", None)
    with (stack.tmp / "ollama.log").open("wb") as out:
        proc = subprocess.Popen([exe, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    processes.append(proc)
    with WorkerClient("ollama", f"http://127.0.0.1:{worker.port}", key=KEY) as client:
        wait_until(lambda: proc.poll() is not None or client.healthy(), 60, "ollama up")
        assert proc.poll() is None
        client.ensure_model(model)  # as deploy does: pulled, copied to its served names
        assert stack.state(worker) == "unloaded"

        loaded = stack.ok("POST", worker, "load")
        assert loaded["state"] == "resident" and loaded["done"] == f"loaded {worker.model} (keep_alive -1)"
        assert client.loaded(model) and stack.state(worker) == "resident"
        (running,) = httpx.get(f"http://127.0.0.1:{worker.port}/api/ps", timeout=30).json()["models"]
        assert int(running["expires_at"][:4]) > 2200  # keep_alive -1: forever (Go's longest duration, 292 years)

        unloaded = stack.ok("POST", worker, "unload")
        assert unloaded["state"] == "unloaded"
        wait_until(lambda: not client.loaded(model), 30, "the model unloaded")
        assert stack.state(worker) == "unloaded"
