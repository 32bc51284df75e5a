"""Helpers to run real programs in tests: free ports, Envoy, the gatekeeper; a stub worker that shows what it got."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int, exclude: Iterable[int] = ()) -> list[int]:
    """``count`` different free ports (held open together while picked, so no two are the same), none in
    ``exclude``. One free_port() after another may hand out the same port twice."""
    taken = set(exclude)
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            if port not in taken:
                ports.append(port)
        return ports
    finally:
        for s in socks:
            s.close()


def gateway_ports(exclude: Iterable[int] = ()) -> dict[str, int]:
    """Free ports for a spec's gateway.ports: those a contract test starts (the rest keep their defaults)."""
    names = ("https", "http", "envoy", "envoy_admin", "gatekeeper", "caddy_admin")
    return dict(zip(names, free_ports(len(names), exclude), strict=True))


def free_port_run(count: int) -> int:
    """A base port with ``count`` consecutive free ports after it, below the kernel's ephemeral range: a run picked
    inside it is free when picked, but any outgoing connection may take one of its ports before the test binds it
    (an Ollama double once failed with "Address already in use" that way)."""
    low = _ephemeral_low()
    for _ in range(200):
        base = random.randrange(10000, max(10001, low - count))
        try:
            socks = []
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections (net.ipv4.ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


class StubWorker:
    """An OpenAI-shaped HTTP worker that answers with what it received.

    Used only where a test must see what reached the worker: the headers and body the gateway forwarded,
    which replica answered, or whether a request reached a worker at all (the Envoy contract tier).
    Where a test needs a worker but not what it received, it runs the real llama-server (tests/llama.py).
    """

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.requests: list[dict[str, Any]] = []
        self.connections: list[socket.socket] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return

            def setup(self) -> None:
                super().setup()
                stub.connections.append(self.connection)

            def _reply(self, status: int, data: dict[str, Any]) -> None:
                body = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path in ("/health", "/api/version"):
                    return self._reply(200, {"status": "ok"})
                if self.path == "/v1/models":
                    stub.requests.append({"worker": stub.name, "path": self.path, "method": "GET"})
                    return self._reply(200, {"object": "list", "data": [{"id": stub.name, "object": "model"}]})
                return self._reply(404, {"error": "not found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                record = {
                    "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
                    "worker": stub.name,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": json.loads(body or b"{}"),
                }
                stub.requests.append(record)
                self._reply(200, record)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> StubWorker:
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop like a killed process: the listener and every open connection go away."""
        self.server.shutdown()
        self.server.server_close()
        for conn in self.connections:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


@contextmanager
def running_process(
    cmd: list[str], ready_url: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``cmd`` started with its output in ``log``, once ``ready_url`` answers 200; stopped afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(ready_url, proc, log)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def running_envoy(envoy: str, config: Path, admin_port: int, log: Path) -> ContextManager[subprocess.Popen[bytes]]:
    cmd = [
        envoy,
        "-c",
        str(config),
        "--disable-hot-restart",
        "--log-level",
        "warn",
        "--file-flush-interval-msec",
        "200",
    ]
    return running_process(cmd, f"http://127.0.0.1:{admin_port}/ready", log)


def running_gatekeeper(
    spec: Path, state_dir: Path, port: int, log: Path, usage_log: Path | None = None
) -> ContextManager[subprocess.Popen[bytes]]:
    """The real gatekeeper (what `controller up` runs), on loopback."""
    cmd = [sys.executable, "-m", "controller.gateway.gatekeeper", "--spec", str(spec), "--state-dir", str(state_dir)]
    cmd += ["--port", str(port)] + (["--usage-log", str(usage_log)] if usage_log else [])
    return running_process(cmd, f"http://127.0.0.1:{port}/healthz", log)


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s: {log.read_text(errors='replace')[-3000:]}")


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
