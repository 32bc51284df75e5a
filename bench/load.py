"""Load for the gateway benchmarks: wrk (closed loop), an open-loop generator, streams, and what each costs.

A :class:`Target` is one path under test. ``wrk`` sends a small chat completion with one key, or with a
different key per request (``Target.keys``: the realistic workload of many keys over users with limits).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.procs import cpu_seconds, rss_mib

ROOT = Path(__file__).resolve().parents[1]
WRK_SCRIPT = ROOT / "bench" / "wrk_chat.lua"
MODEL = "bench"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
STALL_S = 0.200


@dataclass
class Target:
    """One path under test: where to send, with which key, and which processes are its cost."""

    name: str
    url: str  # base URL ending in /v1
    key: str = ""
    keys: list[str] = field(default_factory=list)  # when set: a different key per request, in this order, cycled
    stream_path: str = "/v1/chat/completions"  # the stub streams on a header or on /stream/ (LiteLLM)
    stream_model: str = MODEL
    processes: dict[str, int] = field(default_factory=dict)  # label → PID (with its children): its cost
    others: dict[str, int] = field(default_factory=dict)  # processes shown but not in the request path
    # Called after a wrk run, before its CPU is read: waits until the run's work is done (the gatekeeper
    # has read the run's usage lines into its ledger), so that work is counted in the run it belongs to.
    settle: Callable[[], None] | None = None
    _turn: int = 0

    def next_key(self) -> str:
        """The key of the next request: the one key, or the next of ``keys``."""
        if not self.keys:
            return self.key
        self._turn += 1
        return self.keys[self._turn % len(self.keys)]


# -- closed loop: wrk ----------------------------------------------------------------------------


def wrk(
    target: Target,
    connections: int,
    seconds: float,
    route: str = "/chat/completions",
    body: dict[str, Any] | None = None,
    key_header: str = "authorization",
) -> dict[str, Any]:
    """wrk against ``target`` on ``route`` (under its /v1), with the chat body or ``body``, the key as a bearer
    token or (``key_header="x-api-key"``) as Anthropic's clients send it."""
    watched = {**target.processes, **target.others}
    env = {**os.environ, "BENCH_KEY": target.key, "BENCH_MODEL": MODEL, "BENCH_KEY_HEADER": key_header}
    if body is not None:
        env["BENCH_BODY"] = json.dumps(body, separators=(",", ":"))
    keys_file = None
    if target.keys:  # wrk_chat.lua builds one request per key and sends them in turn
        with tempfile.NamedTemporaryFile("w", prefix="bench-keys-", suffix=".txt", delete=False) as keys_file:
            keys_file.write("\n".join(target.keys) + "\n")
        env["BENCH_KEYS_FILE"] = keys_file.name
    if target.settle is not None:
        target.settle()  # what earlier work left behind is not this run's
    before = cpu_seconds(watched)
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
            target.url + route,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=seconds + 60,
        check=False,
    )
    if target.settle is not None:
        target.settle()
    after = cpu_seconds(watched)
    if keys_file is not None:
        os.unlink(keys_file.name)
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
        key = target.next_key()
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
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


# -- what a run measures ---------------------------------------------------------------------


# Each path gets this much load before it is measured (not counted): connections, caches and, for the
# realistic workload, every key's answer held by each Envoy worker thread, as in a gateway that has been up.
WARM_S = 2.0
WARM_CONNECTIONS = 16


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
    warm_s: float = WARM_S


QUICK = Settings(
    seconds=1,
    concurrency=(1, 64),
    rate=100,
    rate_seconds=1,
    stream_count=1,
    levels=(16,),
    level_bound_s=10,
    warm_s=1,
)
