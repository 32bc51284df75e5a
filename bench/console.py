"""What open operator consoles cost the gateway, and the requests it serves meanwhile.

`python -m bench.console [--seconds 5] [--rounds 1] [--json] [--write docs/performance.md]`

One `controller up` stack in front of the stub model (bench/paths.py, as bench.gateway), the realistic workload:
the team's keys, a different one per request, over users with limits. For 0, 1 and 10 open consoles (each an
admin's `/console/events` stream, read as a browser would) it measures:

- **idle**: the gatekeeper's CPU per second with the consoles open and no requests (what watching costs);
- **under load**: wrk at 64 connections (req/s) and at 1 (p50, p99), and the gatekeeper's CPU per second
  meanwhile; then the stub directly at 1 connection, back to back, so that what the gateway adds to the p99 (the
  chain's less the direct path's) is known per round. The target, as issue 15 words it: with 10 consoles the
  chain's req/s and added p99 stay within 5 % of no console (the chain's whole p99 is reported too);
- the events each console received per second (about one: the collector refreshes once a second, shared).

With ``--rounds N`` the counts take turns N times (0, 1, 10, 0, 1, 10, ...), so a slow stretch of the shared VM
falls on all of them, and each figure is the median of its N points (p99 at c=1 with its range).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.load import Target, wrk
from bench.paths import chain_stack
from bench.procs import cpu_seconds
from bench.report import machine, publish

CONSOLES = (0, 1, 10)
BEGIN, END = "<!-- bench:console:begin -->", "<!-- bench:console:end -->"
IDLE_S = 5.0


class Consoles:
    """``count`` open event streams of the console, each on its own thread, counting what arrives."""

    def __init__(self, base: str, key: str, count: int) -> None:
        self.base, self.key, self.count = base, key, count
        self.events = [0] * count
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(count)]

    def _read(self, i: int) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        with (
            httpx.Client(verify=False, timeout=httpx.Timeout(10, read=30)) as http,  # the stack's own CA, loopback
            http.stream("GET", f"{self.base}/console/events", headers=headers) as reply,
        ):
            reply.raise_for_status()
            for line in reply.iter_lines():
                if line.startswith("event:"):
                    self.events[i] += 1
                if self.stop.is_set():
                    return

    def __enter__(self) -> Consoles:
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + 15
        while self.count and min(self.events) == 0:  # each has its first picture
            if time.monotonic() > deadline:
                raise RuntimeError(f"consoles got no picture in 15 s: {self.events}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=35)


def run(seconds: float, rounds: int = 1) -> list[dict[str, Any]]:
    points: dict[int, list[dict[str, Any]]] = {count: [] for count in CONSOLES}
    tmp = Path(tempfile.mkdtemp(prefix="bench-console-"))
    try:
        with chain_stack(tmp) as (direct, chain, team, _):
            base = chain.url.removesuffix("/v1")
            gatekeeper = {"gatekeeper": team.processes["gatekeeper"]}
            wrk(team, 8, 1)  # warm: connections open, answers kept
            for count in [c for _ in range(rounds) for c in CONSOLES]:
                with Consoles(base, chain.key, count) as consoles:
                    first = list(consoles.events)
                    before, t0 = cpu_seconds(gatekeeper), time.monotonic()
                    time.sleep(IDLE_S)
                    idle_s = time.monotonic() - t0
                    idle = (cpu_seconds(gatekeeper)["gatekeeper"] - before["gatekeeper"]) / idle_s
                    rate = [(e - f) / idle_s for e, f in zip(consoles.events, first, strict=True)]
                    before, t0 = cpu_seconds(gatekeeper), time.monotonic()
                    loaded = wrk(Target(team.name, team.url, keys=team.keys, processes=team.processes), 64, seconds)
                    busy = (cpu_seconds(gatekeeper)["gatekeeper"] - before["gatekeeper"]) / (time.monotonic() - t0)
                    single = wrk(Target(team.name, team.url, keys=team.keys, processes=team.processes), 1, seconds)
                    alone = wrk(direct, 1, seconds)  # the consoles still open: the same machine, back to back
                points[count].append(
                    {
                        "consoles": count,
                        "idle_gatekeeper_cpu_pct": round(idle * 100, 2),
                        "events_per_s": round(sum(rate) / len(rate), 2) if rate else None,
                        "rps_c64": loaded["rps"],
                        "errors": loaded["errors"] + single["errors"],
                        "load_gatekeeper_cpu_pct": round(busy * 100, 1),
                        "p50_ms_c1": single["p50_ms"],
                        "p99_ms_c1": single["p99_ms"],
                        "direct_p99_ms_c1": alone["p99_ms"],
                        "added_p99_ms_c1": round(single["p99_ms"] - alone["p99_ms"], 3),
                    }
                )
                print(f"[bench] {count} console(s): {points[count][-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [_median(count, found) for count, found in points.items()]


def _median(count: int, found: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per console count: the median of each figure over its rounds (errors summed)."""
    row: dict[str, Any] = {"consoles": count, "rounds": len(found)}
    for key in found[0]:
        values = [f[key] for f in found if f[key] is not None]
        if key == "errors":
            row[key] = sum(values)
        elif key != "consoles":
            row[key] = statistics.median(values) if values else None
    p99s = [f["p99_ms_c1"] for f in found]
    row["p99_ms_c1_range"] = [min(p99s), max(p99s)]
    return row


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    none = next(r for r in rows if r["consoles"] == 0)
    ten = next((r for r in rows if r["consoles"] == 10), None)
    if ten is None:
        return []
    rps = (ten["rps_c64"] - none["rps_c64"]) / none["rps_c64"] * 100
    p99 = (ten["p99_ms_c1"] - none["p99_ms_c1"]) / none["p99_ms_c1"] * 100
    if none["added_p99_ms_c1"] <= 0:  # the chain no slower than the stub alone: no share to compare
        return [
            f"10 consoles against none: req/s at c=64 {rps:+.1f} %; added p99 at c=1 not measurable (none's is "
            f"{none['added_p99_ms_c1']:.3f} ms)"
        ]
    added = (ten["added_p99_ms_c1"] - none["added_p99_ms_c1"]) / none["added_p99_ms_c1"] * 100
    return [
        f"10 consoles against none: req/s at c=64 {rps:+.1f} % (target within ±5 %: "
        f"{'met' if abs(rps) <= 5 else 'MISSED'}), added p99 at c=1 {added:+.1f} % (target ≤ +5 %: "
        f"{'met' if added <= 5 else 'MISSED'}); the chain's whole p99 at c=1 {p99:+.1f} %"
    ]


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        BEGIN,
        f"Machine: {machine()}. Command: `{command}`. One stack (the stub model), the team's keys (a different one "
        "per request, users with limits); each console an admin's `/console/events` stream. Gatekeeper CPU in % "
        f"of one core. Medians of {rows[0]['rounds']} round(s), the counts taking turns.",
        "",
        "| consoles | events/s each | gatekeeper CPU idle | req/s c=64 | gatekeeper CPU under load | p50 ms c=1 "
        "| p99 ms c=1 | p99 range | direct p99 ms c=1 | added p99 ms c=1 | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["p99_ms_c1_range"]
        lines.append(
            f"| {r['consoles']} | {r['events_per_s'] if r['events_per_s'] is not None else '-'} "
            f"| {r['idle_gatekeeper_cpu_pct']:.2f} % | {r['rps_c64']:.0f} | {r['load_gatekeeper_cpu_pct']:.1f} % "
            f"| {r['p50_ms_c1']:.2f} | {r['p99_ms_c1']:.2f} | {low:.2f}–{high:.2f} | {r['direct_p99_ms_c1']:.2f} "
            f"| {r['added_p99_ms_c1']:.2f} | {r['errors']} |"
        )
    lines += ["", *verdicts(rows), END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.console", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5, help="length of each wrk point")
    parser.add_argument("--rounds", type=int, default=1, help="turns of every console count; medians reported")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", type=Path, help="update the console section of this Markdown file")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds: 1 or more")
    publish(
        run(args.seconds, args.rounds),
        markdown,
        prog="bench.console",
        as_json=args.json,
        write=args.write,
        section=(BEGIN, END, "Operator console"),
    )


if __name__ == "__main__":
    main()
