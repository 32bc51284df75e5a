"""Backend adapters against the programs: command lines, health, model presence, load/unload, metrics.

llama.cpp always runs for real. vLLM (needs a GPU) and Ollama (no
installable binary here) run for real where installed, otherwise as the
in-repo doubles in tests/doubles, which follow their documented CLIs and
APIs; each test prints which one ran.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.backends.client import WorkerClient
from controller.errors import BackendError
from controller.local.demo_model import write_demo_model
from controller.local.processes import base_env, worker_processes
from controller.local.state import StateDir
from controller.plan import Plan, make_plan
from controller.render import guard
from controller.secrets import ensure_worker_secret, read_worker_key
from controller.spec import load_spec
from tests.conftest import ROOT
from tests.helpers import write_spec
from tests.stubs import free_ports, gateway_ports, wait_until

pytestmark = pytest.mark.contract
GPUS = [{"uuid": f"GPU-00000000-0000-4000-8000-00000000000{i}", "name": "Test GPU", "vram_gib": 80} for i in (1, 2)]


def program(name: str, bin_dir: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The real program if installed, else a shim that runs the double; says which."""
    real = shutil.which(name, path=os.environ.get("PATH", "").replace(str(bin_dir), ""))
    if real and os.environ.get("FLEET_FORCE_DOUBLES") != "1":
        with capsys.disabled():
            print(f"\n[backends] {name}: the real program at {real}")
        return "real"
    shim = bin_dir / name
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m tests.doubles.{name} "$@"\n')
    shim.chmod(0o755)
    with capsys.disabled():
        print(f"\n[backends] {name}: not installed; the double tests/doubles/{name}.py ({shim})")
    return "double"


def model_spec(backend: str, kind: str, tmp: Path) -> dict[str, Any]:
    if backend == "vllm":
        source = {"huggingface": os.environ.get("FLEET_VLLM_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")}
        return {
            "name": "vl",
            "aliases": ["vl-alias"],
            "backend": "vllm",
            "source": source,
            "context": 2048,
            "parallel": 2,
            "gpus_per_replica": 2,
            "options": {"enable-sleep-mode": True},
            "arch": {"layers": 24, "kv_heads": 2, "head_dim": 64, "params_b": 0.5},
        }
    if backend == "ollama":
        return {
            "name": "ol",
            "aliases": ["ol-alias"],
            "backend": "ollama",
            "source": {"ollama": "qwen2.5:0.5b"},
            "context": 2048,
            "parallel": 2,
            "arch": {"layers": 24, "kv_heads": 2, "head_dim": 64, "params_b": 0.5},
        }
    write_demo_model(tmp / "tiny.gguf")
    return {
        "name": "lc",
        "backend": "llamacpp",
        "device": "cpu",
        "source": {"gguf": "tiny.gguf"},
        "context": 512,
        "options": {"threads": 1},
    }


Running = tuple[Plan, WorkerClient, subprocess.Popen[bytes]]


@pytest.fixture(params=["llamacpp", "vllm", "ollama"])
def started(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[tuple[Plan, WorkerClient, dict[str, subprocess.Popen[bytes]]]]:
    """The worker's processes as `controller up` plans them (Ollama: its guard too), by name."""
    backend: str = request.param
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if backend != "llamacpp":
        kind = program(backend, bin_dir, capsys)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    else:
        kind = "real"
    ports = free_ports(2)  # the worker and the agent
    data = {
        "version": 1,
        "name": "b",
        "mesh": {"kind": "none"},
        "hosts": [
            {
                "name": "h",
                "address": "127.0.0.1",
                "gpus": GPUS,
                "cpu_workers": 1,
                "worker_port_base": ports[0],
                "agent_port": ports[1],
            }
        ],
        "models": [model_spec(backend, kind, tmp_path)],
        "gateway": {
            "host": "h",
            "public_name": "localhost",
            "tls": {"mode": "internal"},
            "ports": gateway_ports(exclude=ports),
        },
    }
    spec = write_spec(tmp_path / "fleet.yaml", data)
    plan = make_plan(load_spec(spec))
    (w,) = plan.workers
    state = StateDir(tmp_path / "stack")
    key_file = ensure_worker_secret(state.secrets)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = []
    client = WorkerClient(backend, f"http://127.0.0.1:{w.port}", key=read_worker_key(key_file.parent))
    try:
        for proc_spec in worker_processes(plan, w, spec.parent, state):
            log = (tmp_path / f"{proc_spec.name}.log").open("wb")
            logs.append(log)
            procs[proc_spec.name] = subprocess.Popen(
                proc_spec.argv,
                env={**base_env(), **proc_spec.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def gone() -> bool:
            return any(p.poll() is not None for p in procs.values())

        wait_until(lambda: gone() or client.healthy(), 60 if kind == "double" else 600, "healthy")
        assert not gone(), "\n".join((tmp_path / f"{n}.log").read_text() for n in procs)
        yield plan, client, procs
    finally:
        client.close()
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(20)
        for log in logs:
            log.close()


@pytest.fixture
def worker(started: tuple[Plan, WorkerClient, dict[str, subprocess.Popen[bytes]]]) -> Running:
    """The planned worker's own process (not its guard's), with a client that sends the worker secret."""
    plan, client, procs = started
    (w,) = plan.workers
    return plan, client, procs[w.name]


def test_worker_runs_from_the_planned_command_line(worker: Running) -> None:
    plan, client, _ = worker
    (w,) = plan.workers
    model = plan.model(w.model)
    assert client.healthy()
    client.ensure_model(model)
    assert client.ensure_model(model) == [], "a second ensure does nothing"
    served = client.served_models()
    expected = model.served_names if w.backend != "llamacpp" else [model.name]
    assert all(n in served or f"{n}:latest" in served for n in expected), served


def test_chat_and_metrics(worker: Running) -> None:
    plan, client, _ = worker
    (w,) = plan.workers
    model = plan.model(w.model)
    client.ensure_model(model)
    before = client.metrics()
    for name in model.served_names:
        reply = client.http.post(  # with the worker secret, as Envoy sends it
            "/v1/chat/completions",
            timeout=60,
            json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] > 0
    after = client.metrics()
    if w.backend == "ollama":
        assert after == {} and client.queue_depth() is None  # Ollama exports no metrics
        return
    assert {"running", "waiting", "prompt_tokens", "generation_tokens"} <= set(after)
    assert after["prompt_tokens"] > before["prompt_tokens"]
    assert client.queue_depth() == 0


def test_a_request_without_the_worker_secret_is_refused(worker: Running) -> None:
    """Workers answer only the gateway: without the secret (or with another), the worker itself refuses, on its
    planned port; for Ollama, which has no authentication, its guard does."""
    plan, client, _ = worker
    (w,) = plan.workers
    body = {"model": plan.model(w.model).name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    client.ensure_model(plan.model(w.model))
    secret = client.http.headers["authorization"].removeprefix("Bearer ")
    wrong: list[dict[str, str]] = [{}, {"Authorization": "Bearer not-the-secret"}]
    if w.backend == "ollama":  # the guard takes exactly what Envoy sends (llama-server also reads x-api-key)
        wrong += [{"Authorization": secret}, {"x-api-key": secret}, {"Authorization": f"Basic {secret}"}]
    for headers in wrong:
        reply = httpx.post(f"{client.base_url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert reply.status_code == 401, (headers, reply.text)
        if w.backend == "ollama":
            assert reply.json()["error"]["code"] == "invalid_api_key", reply.text
    assert client.http.post("/v1/chat/completions", json=body, timeout=60).status_code == 200
    assert client.healthy()  # health stays open: Envoy's checks and the agent carry no secret


def test_the_ollama_guard_passes_only_the_gateway_and_only_what_it_asked(
    started: tuple[Plan, WorkerClient, dict[str, subprocess.Popen[bytes]]], tmp_path: Path
) -> None:
    """Ollama's guard, the real Caddy: Ollama's admin routes are refused without the secret too, the health route
    opens only that route, Ollama gets a Host it accepts (the gateway sends the public name) and no secret, and
    the guard's own liveness answers without reaching Ollama."""
    plan, client, procs = started
    (w,) = plan.workers
    if w.backend != "ollama":
        assert list(procs) == [w.name]  # llama-server and vLLM check the secret themselves: no guard
        return
    assert list(procs) == [guard.guard_name(w), w.name]
    base = client.base_url
    for method, path in (("POST", "/api/pull"), ("POST", "/api/copy"), ("DELETE", "/api/delete"), ("GET", "/api/tags")):
        assert httpx.request(method, f"{base}{path}", json={"model": "x"}, timeout=10).status_code == 401, path
    assert httpx.post(f"{base}/api/version", timeout=10).status_code == 401  # only GET/HEAD of the health route
    # Paths that Caddy cleans before matching: into the health route, Ollama gets exactly that route; out of it, a 401.
    assert raw_get(base, "/api/tags/../version") == (200, client.http.get("/api/version").content)
    assert raw_get(base, "/api/version/../tags")[0] == 401
    assert raw_get(base, "/api/version?name=x")[0] == 200
    reply = client.http.get("/api/tags", headers={"Host": "llm.example.org"})
    assert reply.status_code == 200, reply.text  # the guard gives Ollama its own loopback Host
    assert httpx.get(f"{base}{guard.GUARD_HEALTH_PATH}", timeout=10).status_code == 200
    procs[w.name].terminate()
    procs[w.name].wait(20)
    assert httpx.get(f"{base}{guard.GUARD_HEALTH_PATH}", timeout=10).status_code == 200  # the guard's own
    assert not client.healthy()  # the worker's health is Ollama's, through the guard
    assert client.http.get("/api/tags").status_code == 502
    secret = client.http.headers["authorization"].removeprefix("Bearer ")
    for name in procs:
        assert secret not in (tmp_path / f"{name}.log").read_text(errors="replace")
    assert secret not in (tmp_path / "stack" / "config" / guard.config_path(w)).read_text()


def test_the_worker_secret_is_in_no_command_line(
    started: tuple[Plan, WorkerClient, dict[str, subprocess.Popen[bytes]]],
) -> None:
    _, client, procs = started
    secret = client.http.headers["authorization"].removeprefix("Bearer ")
    for proc in procs.values():
        for pid in [proc.pid, *_children(proc.pid)]:
            assert secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()


def raw_get(base: str, path: str) -> tuple[int, bytes]:
    """A GET with the path exactly as given (HTTP clients remove dot segments before sending)."""
    url = httpx.URL(base)
    connection = http.client.HTTPConnection(str(url.host), url.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_load_and_unload(worker: Running) -> None:
    """The controller's load, unload and loaded on the planned worker. Ollama: /api/generate with no prompt loads,
    with keep_alive 0 unloads, and /api/ps (matched by digest) says what is loaded, also when a served name's copy
    loaded it. vLLM: the planned worker is not in development mode, so sleep mode is not there: each call says how to
    get it (tests/contract/test_doubles_vllm.py has them on a worker in development mode). llama.cpp: none."""
    plan, client, _ = worker
    (w,) = plan.workers
    model = plan.model(w.model)
    client.ensure_model(model)
    if w.backend == "llamacpp":
        with pytest.raises(BackendError, match="cannot load or unload"):
            client.unload(model)
        return
    if w.backend == "vllm":
        for call in (client.load, client.unload, client.loaded):
            with pytest.raises(
                BackendError, match=r"404.*make the model on demand .*VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode"
            ):
                call(model)
        return
    client.load(model)
    assert client.loaded(model)
    client.unload(model)
    wait_until(lambda: not client.loaded(model), 30, "unloaded")
    alias = model.served_names[-1]
    assert alias != model.name
    reply = client.http.post(  # loads the model file under the alias's name
        "/v1/chat/completions",
        timeout=60,
        json={"model": alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert reply.status_code == 200, reply.text
    assert [m["name"] for m in client.http.get("/api/ps").json()["models"]] == [f"{alias}:latest"]
    assert client.loaded(model)
    client.unload(model)  # the model's name unloads the file its alias loaded
    wait_until(lambda: not client.loaded(model), 30, "unloaded")
    client.load(model)
    assert client.loaded(model)


def test_pinned_to_the_planned_gpus(worker: Running) -> None:
    plan, _, proc = worker
    (w,) = plan.workers
    environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
    expected = ",".join(g.uuid for g in w.gpus)
    assert f"CUDA_VISIBLE_DEVICES={expected}".encode() in environ


def test_bad_flag_fails_like_the_real_program(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A flag vLLM does not know makes `vllm serve` exit non-zero (argparse), real or double."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kind = program("vllm", bin_dir, capsys)
    exe = shutil.which("vllm") if kind == "real" else str(bin_dir / "vllm")
    assert exe
    started = time.monotonic()
    result = subprocess.run(
        [exe, "serve", "m", "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**base_env(), "CUDA_VISIBLE_DEVICES": "GPU-x"},
        check=False,
    )
    assert result.returncode != 0 and "no-such-flag" in result.stderr
    assert time.monotonic() - started < 300
