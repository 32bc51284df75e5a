"""Benchmark: the gatekeeper's answers to Envoy for a known key, under load.

Runs the real gatekeeper process (uvicorn) on loopback and drives it from
several keep-alive client threads for a fixed time, once per kind of ask:

- ``unlimited``: `GET /auth/check` for a key of a user without limits;
- ``limited``: `GET /auth/check` for a key of a user with `rpm` and
  `daily_tokens` (the decision reads the user's tokens of the day from the
  ledger; the rate itself is Envoy's, so it costs nothing here);
- ``reserve``: `POST /auth/reserve`, the quota lease that user's requests
  spend from (one SQLite transaction: what is recorded and held, the
  booking), each client reporting its previous lease as an Envoy worker
  thread does.

Reported per kind:

- the decision time inside the gatekeeper (its `fleet_gatekeeper_decision_seconds`
  histogram, p50/p99 interpolated within buckets) — the figure the target
  (p99 ≤ 0.5 ms) is about;
- the latency a client sees (HTTP round trip through uvicorn), p50/p99;
- requests per second.

    python -m bench.gatekeeper [--seconds 10] [--clients 8] [--json] [--write docs/performance.md]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.report import machine, write_section
from controller.gateway.keystore import KeyStore
from controller.local.demo import DemoPorts, demo_fleet
from tests.stubs import free_port

ROOT = Path(__file__).resolve().parents[1]
MARK_BEGIN = "<!-- bench:gatekeeper:begin -->"
MARK_END = "<!-- bench:gatekeeper:end -->"


def histogram_quantile(text: str, name: str, q: float) -> float | None:
    """Prometheus-style quantile from cumulative buckets (linear within the bucket)."""
    buckets = sorted(
        (float("inf") if le == "+Inf" else float(le), float(v))
        for le, v in re.findall(rf'^{name}_bucket{{le="([^"]+)"}} ([0-9.e+]+)$', text, re.M)
    )
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-9)
        lower_bound, lower_count = bound, count
    return None


KINDS = ("unlimited", "limited", "reserve")
DAILY_TOKENS = 10**12


def run(seconds: float, clients: int, kind: str = "unlimited") -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-gk-"))
    port = free_port()
    spec = tmp / "fleet.yaml"
    data = demo_fleet(DemoPorts(gatekeeper=port))
    data["users"].append({"name": "bench", "models": ["*"]})
    data["users"].append({"name": "limited", "models": ["*"], "rpm": 600, "daily_tokens": DAILY_TOKENS})
    for model in data["models"]:  # no model file here: give the numbers the estimate needs
        model["arch"] = {"layers": 2, "kv_heads": 4, "head_dim": 16, "params_b": 0.0001}
    spec.write_text(yaml.safe_dump(data))
    key, _ = KeyStore(tmp / "keys.db").create("limited" if kind != "unlimited" else "bench", label="bench")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controller.gateway.gatekeeper",
            "--spec",
            str(spec),
            "--state-dir",
            str(tmp),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the gatekeeper exited: {proc.stdout.read().decode() if proc.stdout else ''}")
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        latencies: list[float] = []
        errors = [0]
        lock = threading.Lock()
        stop = threading.Event()

        def ask(http: httpx.Client, previous: str | None) -> httpx.Response:
            if kind != "reserve":
                return http.get(f"{base}/auth/check", headers={"Authorization": f"Bearer {key}"})
            headers = {"X-Fleet-User": "limited", "X-Fleet-Daily-Tokens": str(DAILY_TOKENS), "X-Fleet-Reserve": "100"}
            if previous:
                headers["X-Fleet-Lease-Report"] = f"{previous}:1:100"  # its one request, as Envoy reports it
            return http.post(f"{base}/auth/reserve", headers=headers)

        def client() -> None:
            mine: list[float] = []
            lease = None
            with httpx.Client(timeout=5) as http:
                while not stop.is_set():
                    began = time.perf_counter()
                    reply = ask(http, lease)
                    mine.append(time.perf_counter() - began)
                    lease = reply.headers.get("x-fleet-lease")
                    if reply.status_code != 200:
                        errors[0] += 1
            with lock:
                latencies.extend(mine)

        with httpx.Client(timeout=5) as warm:
            previous = None
            for _ in range(50):  # warm the key cache and the connection (each lease reported, as in the run)
                previous = ask(warm, previous).headers.get("x-fleet-lease")
        before = httpx.get(f"{base}/metrics").text
        threads = [threading.Thread(target=client) for _ in range(clients)]
        began = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - began
        after = httpx.get(f"{base}/metrics").text
    finally:
        proc.terminate()
        proc.wait(10)
    inside = _delta_histogram(before, after, "fleet_gatekeeper_decision_seconds")
    latencies.sort()
    return {
        "kind": kind,
        "seconds": round(elapsed, 2),
        "clients": clients,
        "requests": len(latencies),
        "errors": errors[0],
        "rps": round(len(latencies) / elapsed, 1),
        # The histogram times /auth/check only: for a lease, the client's figures are the ones there are.
        "decision_p50_ms": _ms(histogram_quantile(inside, "fleet_gatekeeper_decision_seconds", 0.5)),
        "decision_p99_ms": _ms(histogram_quantile(inside, "fleet_gatekeeper_decision_seconds", 0.99))
        if kind != "reserve"
        else None,
        "client_p50_ms": _ms(statistics.median(latencies)) if latencies else None,
        "client_p99_ms": _ms(latencies[int(len(latencies) * 0.99) - 1]) if latencies else None,
    }


def _delta_histogram(before: str, after: str, name: str) -> str:
    """The histogram's buckets counted during the run only (after minus before)."""

    def buckets(text: str) -> dict[str, float]:
        return {le: float(v) for le, v in re.findall(rf'^{name}_bucket{{le="([^"]+)"}} ([0-9.e+]+)$', text, re.M)}

    b, a = buckets(before), buckets(after)
    return "\n".join(f'{name}_bucket{{le="{le}"}} {a[le] - b.get(le, 0.0)}' for le in a)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def markdown(runs: list[dict[str, Any]]) -> str:
    rows = [
        "| ask | run | clients | requests | rps | decision p50 (ms) | decision p99 (ms) | client p50 (ms) "
        "| client p99 (ms) | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        rows.append(
            f"| {r['kind']} | {i} | {r['clients']} | {r['requests']} | {r['rps']} | {r['decision_p50_ms'] or '—'} | "
            f"{r['decision_p99_ms'] or '—'} | {r['client_p50_ms']} | {r['client_p99_ms']} | {r['errors']} |"
        )
    worst = max((r["decision_p99_ms"] or 0) for r in runs if r["kind"] != "reserve")
    verdict = "met" if worst <= 0.5 else "not met"
    return "\n".join(
        [
            MARK_BEGIN,
            f"Machine: {machine()}; load generator on the same cores. Command: "
            f"`python -m bench.gatekeeper --runs {len({r['kind'] for r in runs}) and len(runs) // len(KINDS)}`. "
            "Asks: `unlimited` and `limited` are `GET /auth/check` for a key of a user without limits and of one "
            "with `rpm` and `daily_tokens` (its tokens of the day read from the ledger); `reserve` is the quota "
            "lease (`POST /auth/reserve`, one SQLite transaction), which Envoy asks per worker thread about once "
            "every 10 s for a busy user. The decision figures come from the gatekeeper's own histogram, which "
            "times /auth/check only.",
            "",
            *rows,
            "",
            f"Target p99 ≤ 0.5 ms for the decision inside the gatekeeper, either user: **{verdict}** "
            f"(worst p99 {worst} ms).",
            MARK_END,
        ]
    )


def write(doc: Path, section: str) -> None:
    write_section(doc, MARK_BEGIN, MARK_END, section, "Gatekeeper decision")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="bench.gatekeeper", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", type=Path, help="update the gatekeeper section of this Markdown file")
    args = parser.parse_args()
    runs = [run(args.seconds, args.clients, kind) for kind in KINDS for _ in range(args.runs)]
    if args.json:
        print(json.dumps(runs, indent=2))
    else:
        print(markdown(runs))
    if args.write:
        write(args.write, markdown(runs))


if __name__ == "__main__":
    main()
