"""Benchmark: the whole gateway chain side by side with the direct path and LiteLLM, one run, one machine.

Paths, all in front of the same stub backend (bench/stub.py: Envoy
``direct_response`` for the fixed completion, an asyncio server for streams):

- **direct**: the stub itself;
- **chain**: a real ``controller up`` stack (Envoy terminating TLS, its Lua
  filter authenticating with the gatekeeper's answers) whose one model is a ``vllm``
  worker; a ``vllm`` shim on the stack's PATH execs the stub with vLLM's CLI,
  so the supervisor starts, health-checks and stops the stub as its worker
  (a fake GPU UUID in the spec, as in tests/e2e/test_other_backends.py). The
  direct path is that same worker's port. Requests carry a real API key;
- **litellm**: LiteLLM's proxy from PyPI (``bench/.venv-litellm``), 2 workers,
  a master key, no database, the stub as an ``openai/`` model.

Load: ``wrk`` (closed loop, keep-alive, one thread) at c = 1, 64, 256 with
bench/wrk_chat.lua counting non-2xx answers; an open-loop generator
(asyncio, this process) that sends on a fixed timeline and measures latency
from each request's scheduled time; streams (64 chunks 20 ms apart): time to
first token and the gaps between chunks, then 64, 256 and 512 concurrent
streams, a stall being a gap over 200 ms or a stream that does not finish.
CPU per request of each gateway process: utime+stime from /proc/PID/stat
(with its children) over a wrk run, divided by the requests; RSS after it.

    python -m bench.gateway [--runs 3] [--seconds 8] [--json] [--write docs/performance.md] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench.report import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
MARK_BEGIN = "<!-- bench:gateway:begin -->"
MARK_END = "<!-- bench:gateway:end -->"
LITELLM = ROOT / "bench" / ".venv-litellm" / "bin" / "litellm"
WRK_SCRIPT = ROOT / "bench" / "wrk_chat.lua"
MODEL = "bench"
GPU = "GPU-00000000-0000-4000-8000-0000000000b1"
# The stub as the fleet's one model: a vLLM worker on a fake GPU. Envoy's circuit breakers allow
# 2 × parallel connections: room for c=256 and 512 streams.
STUB_MODEL = {
    "name": MODEL,
    "backend": "vllm",
    "source": {"huggingface": "bench/stub"},
    "context": 2048,
    "parallel": 1024,
    "arch": {"layers": 1, "kv_heads": 1, "head_dim": 8, "params_b": 0.001},
}
STUB_GPU = {"uuid": GPU, "name": "Bench GPU", "vram_gib": 80}
STALL_S = 0.200
GATEWAY = ("caddy", "envoy", "gatekeeper")  # the chain's processes in the request path
ALONE = ("supervisor",)  # the parent of every stack process: counted without its children
ROLE = {"stub": "the backend", "supervisor": "not in the request path", "agent": "not in the request path"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Target:
    """One path under test: where to send, with which key, and which processes are its cost."""

    name: str
    url: str  # base URL ending in /v1
    key: str = ""
    stream_path: str = "/v1/chat/completions"  # the stub streams on a header or on /stream/ (LiteLLM)
    stream_model: str = MODEL
    processes: dict[str, int] = field(default_factory=dict)  # label → PID (with its children): its cost
    others: dict[str, int] = field(default_factory=dict)  # processes shown but not in the request path


# -- processes: CPU and memory ---------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _tree(pid: int, kids: dict[int, list[int]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _per_label(pids: dict[str, int], read: Any) -> dict[str, int]:
    """Sum ``read(pid)`` over each labelled process and its live descendants (only itself for ALONE)."""
    kids = _children()
    out: dict[str, int] = {}
    for label, pid in pids.items():
        total = 0
        for p in [pid] if label in ALONE else _tree(pid, kids):
            with suppress(OSError, IndexError):
                total += read(p)
        out[label] = total
    return out


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """utime+stime of each labelled process (with its descendants, but for ALONE)."""
    return {label: ticks / TICKS for label, ticks in _per_label(pids, _cpu_ticks).items()}


def rss_mib(pids: dict[str, int]) -> dict[str, float]:
    pages = _per_label(pids, lambda p: int(Path(f"/proc/{p}/statm").read_text().split()[1]))
    return {label: round(n * PAGE / 2**20, 1) for label, n in pages.items()}


# -- closed loop: wrk ----------------------------------------------------------------------------


def wrk(target: Target, connections: int, seconds: float) -> dict[str, Any]:
    watched = {**target.processes, **target.others}
    before = cpu_seconds(watched)
    env = {**os.environ, "BENCH_KEY": target.key, "BENCH_MODEL": MODEL}
    result = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(seconds, 1):.0f}s",
            "--timeout",
            "10s",
            "-s",
            str(WRK_SCRIPT),
            target.url + "/chat/completions",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=seconds + 60,
        check=False,
    )
    after = cpu_seconds(watched)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {result.stdout}{result.stderr}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    requests = raw["requests"]
    errors = raw["non2xx"] + raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"]
    cpu = {k: round((after[k] - before[k]) / max(requests, 1) * 1e6, 1) for k in before}
    return {
        "c": connections,
        "requests": requests,
        "rps": round(requests / (raw["duration_us"] / 1e6), 1),
        "errors": errors,
        "error_pct": round(100 * errors / max(requests, 1), 3),
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "cpu_us_per_req": cpu,
        "rss_mib": rss_mib(watched),
    }


# -- a small HTTP/1.1 client for the open loop and for streams ----------------------------------


@functools.cache
def _client_tls() -> ssl.SSLContext:
    """One client TLS context for every connection (building one loads the CA store: tens of ms)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the stack's own internal CA; verifying it is not what is measured
    return context


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Conn:
        parts = urlsplit(url)
        context = _client_tls() if parts.scheme == "https" else None
        reader, writer = await asyncio.open_connection(
            parts.hostname, parts.port, ssl=context, server_hostname=parts.hostname if context else None, limit=2**20
        )
        return cls(reader, writer)

    def send(self, target: Target, path: str, body: dict[str, Any], extra: str = "") -> None:
        data = json.dumps(body).encode()
        auth = f"Authorization: Bearer {target.key}\r\n" if target.key else ""
        host = urlsplit(target.url).netloc
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}{extra}"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        self.writer.write(head.encode() + data)

    async def head(self) -> tuple[int, dict[bytes, bytes]]:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers

    async def chunks(self, headers: dict[bytes, bytes]) -> Any:
        """The body's pieces as they arrive (chunked, sized or until the connection closes)."""
        if b"content-length" in headers:
            yield await self.reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    return
                data = await self.reader.readexactly(size + 2)
                yield data[:-2]
        else:
            while data := await self.reader.read(65536):
                yield data

    def close(self) -> None:
        self.writer.close()


async def _request(conn: Conn, target: Target) -> int:
    conn.send(target, urlsplit(target.url).path + "/chat/completions", CHAT)
    status, headers = await conn.head()
    async for _ in conn.chunks(headers):
        pass
    return status


async def open_loop(target: Target, rate: float, seconds: float, max_conns: int = 512) -> dict[str, Any]:
    """Requests on a fixed timeline (i / rate); latency counts from the scheduled time, so a stall shows."""
    loop = asyncio.get_running_loop()
    idle: list[Conn] = []
    slots = asyncio.Semaphore(max_conns)
    latencies: list[float] = []
    errors = [0]
    late: list[float] = []  # how late this generator itself issued each request

    async def one(scheduled: float) -> None:
        async with slots:
            late.append(loop.time() - scheduled)
            conn = idle.pop() if idle else None
            try:
                if conn is None:
                    conn = await Conn.open(target.url)
                status = await asyncio.wait_for(_request(conn, target), 30)
                latencies.append(loop.time() - scheduled)
                if not 200 <= status < 300:
                    errors[0] += 1
                idle.append(conn)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                errors[0] += 1
                if conn is not None:
                    conn.close()

    total = int(rate * seconds)
    start = loop.time() + 0.05
    tasks = []
    for i in range(total):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    latencies.sort()
    late.sort()
    return {
        "rate": rate,
        "requests": total,
        "errors": errors[0],
        "p50_ms": _pct(latencies, 0.5),
        "p99_ms": _pct(latencies, 0.99),
        "max_ms": _pct(latencies, 1.0),
        "generator_late_p99_ms": _pct(late, 0.99),
        "achieved_rps": round(len(latencies) / max(loop.time() - start, 1e-9), 1),
    }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, max(0, round(q * len(values)) - 1))] * 1000, 3)


# -- streams ------------------------------------------------------------------------------------


async def one_stream(target: Target, pool: list[Conn]) -> dict[str, Any]:
    """One streamed chat completion: time to first token, the gaps between chunks, whether it finished.

    On a kept-alive connection from ``pool`` where there is one (as SDK clients do), returned there after.
    """
    body = {**CHAT, "model": target.stream_model, "stream": True}
    conn = pool.pop() if pool else None
    try:
        if conn is None:
            conn = await Conn.open(target.url)
        began = time.monotonic()
        conn.send(target, target.stream_path, body, "x-bench-stream: 1\r\n")
        status, headers = await conn.head()
        arrivals: list[float] = []
        events = 0
        done = False
        async for piece in conn.chunks(headers):
            n = piece.count(b"data:")
            if n:
                arrivals.append(time.monotonic())
                events += n
                done = done or b"[DONE]" in piece
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        ok = 200 <= status < 300 and done and events >= 64
        if ok and headers.get(b"connection", b"").lower() != b"close":
            pool.append(conn)
            conn = None
        return {"ok": ok, "ttft": arrivals[0] - began if arrivals else None, "gaps": gaps}
    except (OSError, asyncio.IncompleteReadError, ValueError):
        return {"ok": False, "ttft": None, "gaps": []}
    finally:
        if conn is not None:
            conn.close()


async def stream_latency(target: Target, count: int) -> dict[str, Any]:
    """``count`` streams one after another on one kept-alive connection (after one to open it)."""
    pool: list[Conn] = []
    await one_stream(target, pool)
    results = [await one_stream(target, pool) for _ in range(count)]
    for conn in pool:
        conn.close()
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    gaps = sorted(g for r in results for g in r["gaps"])
    return {
        "streams": count,
        "failed": sum(not r["ok"] for r in results),
        "ttft_p50_ms": _pct(ttfts, 0.5),
        "gap_p50_ms": _pct(gaps, 0.5),
        "gap_p99_ms": _pct(gaps, 0.99),
        "gap_max_ms": _pct(gaps, 1.0),
    }


async def fill_pool(target: Target, pool: list[Conn], n: int) -> None:
    """Open connections (TLS handshakes included) until ``pool`` holds ``n``, a few at a time, before a level.

    SDK clients keep their connections; and the harness's own handshakes (Python, on the same two cores)
    would otherwise be counted as the gateway's stalls.
    """
    limit = asyncio.Semaphore(16)

    async def one() -> None:
        async with limit:
            with suppress(OSError):
                pool.append(await Conn.open(target.url))

    await asyncio.gather(*(one() for _ in range(n - len(pool))))


async def stream_level(target: Target, n: int, ramp_s: float, bound_s: float, pool: list[Conn]) -> dict[str, Any]:
    """``n`` concurrent streams (started evenly over ``ramp_s``); a stall is a gap over STALL_S or no finish."""

    async def delayed(i: int) -> dict[str, Any]:
        await asyncio.sleep(ramp_s * i / n)
        return await one_stream(target, pool)

    await fill_pool(target, pool, n)
    cpu_before, wall_before = time.process_time(), time.monotonic()
    tasks = [asyncio.create_task(delayed(i)) for i in range(n)]
    done, pending = await asyncio.wait(tasks, timeout=bound_s)
    client_cpu = (time.process_time() - cpu_before) / max(time.monotonic() - wall_before, 1e-9)
    for task in pending:
        task.cancel()
    results = [t.result() for t in done]
    failed = sum(1 for r in results if not r["ok"])
    gapped = sum(1 for r in results if r["ok"] and any(g > STALL_S for g in r["gaps"]))
    stalled = len(pending) + failed + gapped
    gaps = sorted(g for r in results for g in r["gaps"])
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    return {
        "streams": n,
        "stalled": stalled,
        "unfinished": len(pending),
        "failed": failed,
        "gap_over_stall": gapped,
        "gap_p99_ms": _pct(gaps, 0.99),
        "gap_max_ms": _pct(gaps, 1.0),
        "ttft_p99_ms": _pct(ttfts, 0.99),
        "client_cpu_pct": round(100 * client_cpu, 1),  # the harness itself (stream client), % of one core
    }


# -- the paths ----------------------------------------------------------------------------------


def stub_path(bin_dir: Path) -> dict[str, str]:
    """The environment whose PATH has a `vllm` shim in ``bin_dir`` starting the stub (bench/stub.py)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "vllm"
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m bench.stub "$@"\n')
    shim.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def stub_fleet(data: dict[str, Any]) -> None:
    """The demo fleet with the stub as its only model, on a (pretend) GPU."""
    data["hosts"][0]["gpus"] = [dict(STUB_GPU)]
    data["models"] = [dict(STUB_MODEL)]


@contextmanager
def chain_stack(tmp: Path) -> Iterator[tuple[Target, Target, Any]]:
    """A `controller up` stack whose only model is the stub, started by a `vllm` shim on PATH."""
    from tests.e2e.stack import cli, start_stack, stop_stack

    env = stub_path(tmp / "bin")
    customize = stub_fleet
    for attempt in range(3):  # free ports are picked one by one and may collide: try again with others
        home = tmp / f"stack{attempt}"
        try:
            stack = start_stack(home, customize, env=env)
            break
        except BaseException as exc:  # not healthy, or stopped while starting: the supervisor may be up already
            cli("down", "--state-dir", str(home / "state"))
            if attempt == 2 or not isinstance(exc, AssertionError) or "already taken" not in str(exc):
                raise
    tmp = home
    try:
        procs = stack.processes()
        (worker,) = [p for p in procs.values() if p["kind"] == "worker"]
        gateway = {kind: p["pid"] for p in procs.values() if (kind := p["kind"]) in ("caddy", "envoy", "gatekeeper")}
        stub = {"stub": worker["pid"]}
        direct = Target("direct", f"http://127.0.0.1:{worker['ports'][0]}/v1", processes=stub)
        others = {"supervisor": _supervisor(stack.state.root), "agent": procs["agent"]["pid"], **stub}
        others = {k: v for k, v in others.items() if v}
        chain = Target("chain", stack.base_url, stack.key, processes=gateway, others=others)
        # A breakdown, not a client path: Envoy's plain-HTTP loopback listener with the same key, so Envoy and
        # its Lua filter (authentication included) are measured without TLS.
        envoy_only = Target(
            "envoy-only",
            f"http://127.0.0.1:{stack.ports.envoy}/v1",
            stack.key,
            processes={"envoy": gateway["envoy"], "gatekeeper": gateway["gatekeeper"]},
            others=stub,
        )
        yield direct, chain, envoy_only
    finally:
        try:
            stop_stack(stack)
        except BaseException:
            cli("down", "--state-dir", str(tmp / "state"))
            raise


def _supervisor(state_root: Path) -> int | None:
    marker = str(state_root).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                cmd = (entry / "cmdline").read_bytes()
                if b"controller.local.supervisor" in cmd and marker in cmd:
                    return int(entry.name)
    return None


@contextmanager
def litellm_proxy(tmp: Path, stub_url: str) -> Iterator[Target]:
    port = _free_port()
    key = "sk-bench-litellm-master"
    config = tmp / "litellm.yaml"
    stub = stub_url.removesuffix("/v1")
    config.write_text(
        json.dumps(
            {
                "model_list": [
                    {"model_name": MODEL, "litellm_params": {"model": f"openai/{MODEL}", "api_base": f"{stub}/v1"}},
                    {
                        "model_name": f"{MODEL}-stream",
                        "litellm_params": {"model": f"openai/{MODEL}", "api_base": f"{stub}/stream/v1"},
                    },
                ],
                "general_settings": {"master_key": key},
                "litellm_settings": {"drop_params": True},
            }
        )
    )
    log = (tmp / "litellm.log").open("wb")
    env = {**os.environ, "OPENAI_API_KEY": "sk-unused", "LITELLM_LOG": "ERROR", "DISABLE_ADMIN_UI": "True"}
    env.pop("DATABASE_URL", None)
    proc = subprocess.Popen(
        [str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "2"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"litellm exited: {(tmp / 'litellm.log').read_text()[-2000:]}")
            with suppress(httpx.HTTPError):
                reply = httpx.post(
                    f"{base}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}, timeout=5
                )
                if reply.status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"litellm not ready: {(tmp / 'litellm.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield Target(
            "litellm",
            f"{base}/v1",
            key,
            stream_model=f"{MODEL}-stream",
            processes={"litellm": proc.pid},
        )
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


def _litellm_version() -> str:
    python = LITELLM.parent / "python"
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=False)
    return result.stdout.strip() or "(version unknown)"


def _free_port() -> int:
    from tests.stubs import free_port

    return free_port()


# -- one run ------------------------------------------------------------------------------------


@dataclass
class Settings:
    seconds: float = 8
    concurrency: tuple[int, ...] = (1, 64, 256)
    rate: float = 300
    rate_seconds: float = 8
    stream_count: int = 5
    levels: tuple[int, ...] = (64, 256, 512)
    ramp_s: float = 0.5
    level_bound_s: float = 20


QUICK = Settings(
    seconds=1, concurrency=(1, 64), rate=100, rate_seconds=1, stream_count=1, levels=(16,), level_bound_s=10
)


def measure(target: Target, s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {"closed": [wrk(target, c, s.seconds) for c in s.concurrency]}
    out["open"] = asyncio.run(open_loop(target, s.rate, s.rate_seconds))
    out["stream"] = asyncio.run(stream_latency(target, s.stream_count))
    out["levels"] = asyncio.run(stream_levels(target, s))
    return out


async def stream_levels(target: Target, s: Settings) -> list[dict[str, Any]]:
    """The ramp, stopping at the first level with a stall; connections kept alive from one level to the next."""
    pool: list[Conn] = []
    levels = []
    for n in s.levels:
        level = await stream_level(target, n, s.ramp_s, s.level_bound_s, pool)
        levels.append(level)
        if level["stalled"]:
            break
    for conn in pool:
        conn.close()
    return levels


def run_all(s: Settings, runs: int, with_litellm: bool, after_run: Any = None) -> dict[str, Any]:
    """Every path, ``runs`` times over; ``after_run(data)`` gets the results so far after each full run."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-gw-"))
    notes: list[str] = []
    results: dict[str, list[dict[str, Any]]] = {"direct": [], "envoy-only": [], "chain": [], "litellm": []}
    with chain_stack(tmp) as (direct, chain, envoy_only):
        litellm = None
        lite_ctx = None
        if with_litellm and LITELLM.exists():
            lite_ctx = litellm_proxy(tmp, direct.url)
            try:
                litellm = lite_ctx.__enter__()
                notes.append(f"LiteLLM {_litellm_version()} (PyPI, `bench/.venv-litellm`), 2 workers, no database.")
            except RuntimeError as exc:
                notes.append(f"LiteLLM could not be started: {exc}")
                lite_ctx = None
        elif with_litellm:
            notes.append(
                f"LiteLLM is not installed ({LITELLM} missing: "
                "python3 -m venv bench/.venv-litellm && bench/.venv-litellm/bin/pip install 'litellm[proxy]'); skipped"
            )
        else:
            notes.append("LiteLLM skipped (--no-litellm)")
        try:
            for i in range(runs):
                for target in (direct, envoy_only, chain, litellm):
                    if target is not None:
                        print(f"[bench] run {i + 1}/{runs}: {target.name}", file=sys.stderr, flush=True)
                        results[target.name].append({"url": target.url, **measure(target, s)})
                if after_run is not None:
                    after_run(_data(results, s, i + 1, notes))
        finally:
            if lite_ctx is not None:
                lite_ctx.__exit__(None, None, None)
    shutil.rmtree(tmp, ignore_errors=True)
    return _data(results, s, runs, notes)


def _data(results: dict[str, list[dict[str, Any]]], s: Settings, runs: int, notes: list[str]) -> dict[str, Any]:
    done = {k: v[:runs] for k, v in results.items()}
    return {
        "machine": machine(),
        "settings": s.__dict__,
        "runs": runs,
        "notes": notes,
        "paths": {k: v for k, v in done.items() if v},
        "summary": summarize(done, s),
    }


# -- summary ------------------------------------------------------------------------------------


def _med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def _span(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    med = statistics.median(vals)
    if min(vals) == max(vals):
        return _num(med)
    return f"{_num(med)} ({_num(min(vals))}–{_num(max(vals))})"


def _num(v: float) -> str:
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def summarize(results: dict[str, list[dict[str, Any]]], s: Settings) -> dict[str, Any]:
    """Medians over runs; 'added' figures are each run's path minus that run's direct path."""
    direct = results["direct"]
    summary: dict[str, Any] = {}
    for name, runs in results.items():
        if not runs:
            continue
        closed = {}
        for ci, c in enumerate(s.concurrency):
            rows = [r["closed"][ci] for r in runs]
            base = [d["closed"][ci] for d in direct]
            closed[str(c)] = {
                "p50_ms": [r["p50_ms"] for r in rows],
                "p99_ms": [r["p99_ms"] for r in rows],
                "added_p50_ms": [round(r["p50_ms"] - b["p50_ms"], 3) for r, b in zip(rows, base, strict=True)],
                "added_p99_ms": [round(r["p99_ms"] - b["p99_ms"], 3) for r, b in zip(rows, base, strict=True)],
                "rps": [r["rps"] for r in rows],
                "error_pct": [r["error_pct"] for r in rows],
                "cpu_us_per_req": {k: [r["cpu_us_per_req"][k] for r in rows] for k in rows[0]["cpu_us_per_req"]},
                "rss_mib": {k: [r["rss_mib"][k] for r in rows] for k in rows[0]["rss_mib"]},
            }
        summary[name] = {
            "closed": closed,
            "open": {
                "p50_ms": [r["open"]["p50_ms"] for r in runs],
                "p99_ms": [r["open"]["p99_ms"] for r in runs],
                "errors": [r["open"]["errors"] for r in runs],
                "generator_late_p99_ms": [r["open"]["generator_late_p99_ms"] for r in runs],
            },
            "stream": {
                "ttft_p50_ms": [r["stream"]["ttft_p50_ms"] for r in runs],
                "added_ttft_p50_ms": [
                    _sub(r["stream"]["ttft_p50_ms"], d["stream"]["ttft_p50_ms"])
                    for r, d in zip(runs, direct, strict=True)
                ],
                "gap_p50_ms": [r["stream"]["gap_p50_ms"] for r in runs],
                "gap_p99_ms": [r["stream"]["gap_p99_ms"] for r in runs],
                "added_gap_p50_ms": [
                    _sub(r["stream"]["gap_p50_ms"], d["stream"]["gap_p50_ms"])
                    for r, d in zip(runs, direct, strict=True)
                ],
                "added_gap_p99_ms": [
                    _sub(r["stream"]["gap_p99_ms"], d["stream"]["gap_p99_ms"])
                    for r, d in zip(runs, direct, strict=True)
                ],
                "held_without_stall": [
                    max([lv["streams"] for lv in r["levels"] if lv["stalled"] == 0], default=0) for r in runs
                ],
            },
        }
    return summary


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def targets(summary: dict[str, Any], s: Settings) -> list[tuple[str, str, bool | None]]:
    out: list[tuple[str, str, bool | None]] = []
    chain = summary.get("chain")
    if chain is None:
        return out
    c1 = chain["closed"].get("1")
    if c1:
        p50, p99 = max(c1["added_p50_ms"]), max(c1["added_p99_ms"])
        out.append(("chain added p50 ≤ 0.5 ms at c=1", f"worst run {p50:.3f} ms", p50 <= 0.5))
        out.append(("chain added p99 ≤ 2 ms at c=1", f"worst run {p99:.3f} ms", p99 <= 2.0))
    c64 = chain["closed"].get("64")
    lite = summary.get("litellm", {}).get("closed", {}).get("64")
    if c64 and lite:
        ratio = (_med(c64["rps"]) or 0) / max(_med(lite["rps"]) or 1e-9, 1e-9)
        out.append(("≥ 30 × LiteLLM's RPS at c=64", f"{ratio:.1f}×", ratio >= 30))
    elif c64:
        out.append(("≥ 30 × LiteLLM's RPS at c=64", "LiteLLM not measured", None))
    if c64:
        cpu = sum(_med(v) or 0 for k, v in c64["cpu_us_per_req"].items() if k in GATEWAY)
        out.append(("gateway CPU ≤ 150 µs per request (Caddy + Envoy + gatekeeper, c=64)", f"{cpu:.0f} µs", cpu <= 150))
    held = min(chain["stream"]["held_without_stall"])
    top = max(s.levels)
    out.append(
        (f"≥ 512 concurrent streams without a stall (tried up to {top})", f"{held} held (worst run)", held >= 512)
    )
    return out


def markdown(data: dict[str, Any], command: str) -> str:
    summary, s = data["summary"], Settings(**data["settings"])
    s.concurrency, s.levels = tuple(s.concurrency), tuple(s.levels)
    lines = [
        MARK_BEGIN,
        f"Machine: {data['machine']}. Load generators (wrk, one thread; the Python open-loop and stream "
        f"clients) share the cores with the gateway and the stub. Command: `{command}`. "
        f"Each figure is the median of {data['runs']} run(s), with the range in brackets; "
        "'added' is each run's path minus the direct path of the same run.",
        "",
    ]
    lines += [f"> {note}" for note in data["notes"]]
    if data["notes"]:
        lines.append("")
    lines += [
        f"**Closed loop** (wrk, keep-alive, POST /v1/chat/completions, {s.seconds:g} s per point):",
        "",
        "| path | c | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s | errors % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, sm in summary.items():
        for c, row in sm["closed"].items():
            added = name != "direct"
            lines.append(
                f"| {name} | {c} | {_span(row['p50_ms'])} | {_span(row['p99_ms'])} | "
                f"{_span(row['added_p50_ms']) if added else '—'} | {_span(row['added_p99_ms']) if added else '—'} | "
                f"{_span(row['rps'])} | {_span(row['error_pct'])} |"
            )
    lines += [
        "",
        f"**Open loop** ({s.rate:g} requests/s on a fixed timeline for {s.rate_seconds:g} s, latency from the "
        "scheduled time; the generator is Python asyncio in one process, so the rate is kept well below what it "
        "can issue — its own lateness p99 is shown):",
        "",
        "| path | p50 ms | p99 ms | errors | generator late p99 ms |",
        "|---|---|---|---|---|",
    ]
    for name, sm in summary.items():
        o = sm["open"]
        lines.append(
            f"| {name} | {_span(o['p50_ms'])} | {_span(o['p99_ms'])} | {_span(o['errors'])} | "
            f"{_span(o['generator_late_p99_ms'])} |"
        )
    lines += [
        "",
        f"**Streaming** (64 chunks 20 ms apart; TTFT and gaps from {s.stream_count} streams one after another; "
        f"then {', '.join(map(str, s.levels))} concurrent streams started over {s.ramp_s:g} s, a stall being a gap "
        f"over {STALL_S * 1000:.0f} ms or a stream not finished within {s.level_bound_s:g} s):",
        "",
        "| path | TTFT p50 ms | added TTFT ms | gap p50 ms | gap p99 ms | added gap p50 ms | added gap p99 ms | "
        "streams held without a stall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, sm in summary.items():
        st = sm["stream"]
        added = name != "direct"
        lines.append(
            f"| {name} | {_span(st['ttft_p50_ms'])} | {_span(st['added_ttft_p50_ms']) if added else '—'} | "
            f"{_span(st['gap_p50_ms'])} | {_span(st['gap_p99_ms'])} | "
            f"{_span(st['added_gap_p50_ms']) if added else '—'} | {_span(st['added_gap_p99_ms']) if added else '—'} | "
            f"{_span(st['held_without_stall'])} |"
        )
    lines += [
        "",
        "Concurrent streams, level by level (connections, TLS handshakes included, are opened before each level; "
        "the ramp stops at the first level with a stall; 'failed' = not a complete 2xx stream, 'gap > 200 ms' = "
        "complete but stalled; 'client CPU' = the harness's own stream client during the level, % of one core):",
        "",
        "| path | streams | runs | stalled | unfinished | failed | gap > 200 ms | gap p99 ms | gap max ms | TTFT p99 ms "
        "| client CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in data["paths"].items():
        for n in s.levels:
            found = [lv for r in runs for lv in r["levels"] if lv["streams"] == n]
            if not found:
                continue
            cells = [
                _span([lv.get(k) for lv in found])
                for k in (
                    "stalled",
                    "unfinished",
                    "failed",
                    "gap_over_stall",
                    "gap_p99_ms",
                    "gap_max_ms",
                    "ttft_p99_ms",
                    "client_cpu_pct",
                )
            ]
            lines.append(f"| {name} | {n} | {len(found)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**CPU per request and memory** (utime+stime from /proc over each wrk run, divided by its requests; "
        "RSS with children after it):",
        "",
        "| path | process | " + " | ".join(f"µs/req c={c}" for c in s.concurrency) + " | RSS MiB |",
        "|---|---|" + "---|" * (len(s.concurrency) + 1),
    ]
    for name, sm in summary.items():
        first = next(iter(sm["closed"].values()))
        for proc in first["cpu_us_per_req"]:
            cells = [_span(sm["closed"][str(c)]["cpu_us_per_req"][proc]) for c in s.concurrency]
            label = f"{proc} ({ROLE[proc]})" if proc in ROLE else proc
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + f" | {_span(first['rss_mib'][proc])} |")
    chain = summary.get("chain", {}).get("closed", {}).get("64")
    if chain:
        shares = {k: _med(v) or 0 for k, v in chain["cpu_us_per_req"].items() if k in GATEWAY}
        total = sum(shares.values()) or 1
        parts = ", ".join(f"{k} {v:.0f} µs ({100 * v / total:.0f} %)" for k, v in shares.items())
        lines += [
            "",
            f"Where the chain's CPU goes at c=64: {parts}; {total:.0f} µs per request in all, so two cores "
            f"(shared with the load generator and the stub) cap the chain near {2e6 / total:,.0f} requests/s.",
        ]
    lines += ["", "**Targets of issue 6** (chain against the direct path of the same run):", ""]
    lines += ["| target | measured | verdict |", "|---|---|---|"]
    for label, value, ok in targets(summary, s):
        verdict = "not measured" if ok is None else ("**met**" if ok else "**not met**")
        lines.append(f"| {label} | {value} | {verdict} |")
    lines.append(MARK_END)
    return "\n".join(lines)


def write(doc: Path, section: str) -> None:
    write_section(doc, MARK_BEGIN, MARK_END, section, "Gateway: direct, chain and LiteLLM")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="bench.gateway", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8, help="length of each wrk point")
    parser.add_argument("--rate", type=float, default=300, help="open-loop arrival rate (requests/s)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (one run)")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", type=Path, help="update the gateway section of this Markdown file")
    parser.add_argument("--from-json", type=Path, help="no measuring: render the results a --json run printed")
    args = parser.parse_args()
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        command = data.get("command") or (
            f"python -m bench.gateway --runs {data['runs']} --seconds {data['settings']['seconds']:g} "
            "--write docs/performance.md"
        )
        print(markdown(data, command))
        if args.write:
            write(args.write, markdown(data, command))
        return

    # Stopped by a signal (even as a background job, where SIGINT is ignored), still take the stack down.
    def stop(*_: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop; the cleanup itself runs uninterrupted
        sys.exit(143)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk (scripts/bootstrap installs it)")
    settings = QUICK if args.quick else Settings(seconds=args.seconds, rate=args.rate, rate_seconds=args.seconds)
    runs = 1 if args.quick else args.runs
    command = ("python -m bench.gateway " + " ".join(a for a in sys.argv[1:] if a != "--json")).strip()

    def save(data: dict[str, Any]) -> None:  # after each run, so a stopped benchmark keeps what it measured
        if args.write:
            write(args.write, markdown(data, command))

    data = {**run_all(settings, runs, with_litellm=not args.no_litellm, after_run=save), "command": command}
    print(json.dumps(data, indent=2) if args.json else markdown(data, command))


if __name__ == "__main__":
    main()
