"""Benchmark: the gatekeeper's reading of Envoy's usage log, per line and per burst.

The gateway's p99 at one connection is set less by how much CPU the gatekeeper
spends in the background than by how long it holds a core at a time: a request
whose turn comes while a core is busy waits. So this measures both, on lines
shaped like Envoy's (controller/render/envoy.py: usage_log_config):

- ``paced``: as the gatekeeper reads, with its pause between slices of lines;
- ``unpaced``: as `controller usage` reads (and the gatekeeper when it is more
  than a batch behind): one burst per batch.

"Longest burst" is the longest stretch of CPU between two pauses (for
``unpaced``, the whole read), timed with the thread's own CPU clock.

    python -m bench.ledger [--lines 20000] [--runs 3] [--json] [--write docs/performance.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.report import machine, write_section
from controller.services.gatekeeper import INGEST_PAUSE_S
from controller.services.ledger import SLICE_LINES, Ledger


def usage_lines(count: int) -> bytes:
    now = time.time()
    return b"".join(
        json.dumps(
            {
                "completion_tokens": "10",
                "key_id": "b3bcfb7816d8",
                "model": "bench",
                "ms": 1,
                "prompt_tokens": "12",
                "request_id": str(uuid.uuid4()),
                "status": 200,
                "time": f"{now + i / 1000:.3f}",
                "user": f"user{i % 4}",
            },
            separators=(",", ":"),
        ).encode()
        + b"\n"
        for i in range(count)
    )


def measure(lines: int, paced: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "usage.log"
        log.write_bytes(usage_lines(lines))
        ledger = Ledger(Path(tmp) / "usage.db")
        bursts: list[float] = []
        mark = [time.thread_time()]

        def pause() -> None:
            now = time.thread_time()
            bursts.append(now - mark[0])
            time.sleep(INGEST_PAUSE_S)
            mark[0] = time.thread_time()

        began_wall, began_cpu = time.perf_counter(), time.thread_time()
        added = ledger.ingest(log, pause=pause if paced else None)
        cpu = time.thread_time() - began_cpu
        bursts.append(time.thread_time() - mark[0])
        wall = time.perf_counter() - began_wall
        ledger.close()
    assert added == lines, (added, lines)
    return {
        "variant": "paced" if paced else "unpaced",
        "lines": lines,
        "cpu_us_per_line": round(cpu / lines * 1e6, 2),
        "longest_burst_ms": round(max(bursts) * 1e3, 3),
        "bursts": len(bursts),
        "wall_s": round(wall, 3),
        "lines_per_s": round(lines / wall),
    }


def run(lines: int, runs: int) -> list[dict[str, Any]]:
    results: dict[str, list[dict[str, Any]]] = {"paced": [], "unpaced": []}
    for _ in range(runs):
        for paced in (True, False):
            row = measure(lines, paced)
            results[row["variant"]].append(row)
    out = []
    for variant, rows in results.items():
        out.append(
            {
                "variant": variant,
                "lines": lines,
                "runs": runs,
                "cpu_us_per_line": statistics.median(r["cpu_us_per_line"] for r in rows),
                "longest_burst_ms": max(r["longest_burst_ms"] for r in rows),
                "bursts": rows[0]["bursts"],
                "lines_per_s": statistics.median(r["lines_per_s"] for r in rows),
            }
        )
    return out


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    out = [
        "<!-- bench:ledger:begin -->",
        f"Machine: {machine()}. Command: `{command}`. {rows[0]['lines']:,} usage lines shaped like Envoy's, "
        f"read into a fresh ledger; {SLICE_LINES} lines per slice, {INGEST_PAUSE_S * 1e3:g} ms pause "
        f"between slices when paced; median of {rows[0]['runs']} runs (longest burst: the worst run).",
        "",
        "| variant | CPU µs per line | longest burst ms | bursts | lines/s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        out.append(
            f"| {row['variant']} | {row['cpu_us_per_line']} | {row['longest_burst_ms']} | {row['bursts']} "
            f"| {row['lines_per_s']:,} |"
        )
    out.append("<!-- bench:ledger:end -->")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__)
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", type=Path, help="update the ledger section of this Markdown file")
    args = parser.parse_args()
    rows = run(args.lines, args.runs)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    command = f"python -m bench.ledger --lines {args.lines} --runs {args.runs}"
    text = markdown(rows, command + (f" --write {args.write}" if args.write else ""))
    print(text)
    if args.write:
        write_section(
            args.write, "<!-- bench:ledger:begin -->", "<!-- bench:ledger:end -->", text, "Reading the usage log"
        )


if __name__ == "__main__":
    main()
