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

With ``--grow-to N`` it also fills one ledger in bulk reads of 200,000 lines
up to N rows, and after each, times a paced read of 1,300 lines (what the
gatekeeper reads every half second at ~2,600 requests/s): does the cost
grow with the ledger?

    python -m bench.ledger [--lines 20000] [--runs 3] [--grow-to 1000000] [--json] [--write docs/performance.md]
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
from controller.gateway.gatekeeper import INGEST_PAUSE_S
from controller.gateway.ledger import SLICE_LINES, Ledger


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


def timed_read(ledger: Ledger, log: Path, paced: bool) -> tuple[int, float, list[float]]:
    """Requests added, the reading thread's CPU seconds, and its bursts of CPU between pauses."""
    bursts: list[float] = []
    mark = time.thread_time()

    def pause() -> None:
        nonlocal mark
        bursts.append(time.thread_time() - mark)
        time.sleep(INGEST_PAUSE_S)
        mark = time.thread_time()

    began = time.thread_time()
    added = ledger.ingest(log, pause=pause if paced else None)
    bursts.append(time.thread_time() - mark)
    return added, time.thread_time() - began, bursts


def measure(lines: int, paced: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "usage.log"
        log.write_bytes(usage_lines(lines))
        ledger = Ledger(Path(tmp) / "usage.db")
        began = time.perf_counter()
        added, cpu, bursts = timed_read(ledger, log, paced)
        wall = time.perf_counter() - began
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


def growth(rows: int, step: int = 200_000, read: int = 1_300) -> list[dict[str, Any]]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "usage.log"
        ledger = Ledger(Path(tmp) / "usage.db")
        recorded = 0
        while recorded < rows:
            with log.open("ab") as handle:
                handle.write(usage_lines(min(step, rows - recorded)))
            recorded += ledger.ingest(log)
            with log.open("ab") as handle:
                handle.write(usage_lines(read))
            added, cpu, bursts = timed_read(ledger, log, paced=True)
            recorded += added
            out.append(
                {
                    "rows": recorded,
                    "cpu_us_per_line": round(cpu / read * 1e6, 2),
                    "longest_burst_ms": round(max(bursts) * 1e3, 3),
                }
            )
        ledger.close()
    return out


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


def markdown(rows: list[dict[str, Any]], grown: list[dict[str, Any]], command: str) -> str:
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
    if grown:
        out += [
            "",
            "As the ledger grows (bulk reads of 200,000 lines, each followed by a paced read of 1,300):",
            "",
            "| rows in the ledger | CPU µs per line | longest burst ms |",
            "|---|---|---|",
        ]
        out += [f"| {g['rows']:,} | {g['cpu_us_per_line']} | {g['longest_burst_ms']} |" for g in grown]
    out.append("<!-- bench:ledger:end -->")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__)
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--grow-to", type=int, default=0, help="also time reads as one ledger grows to N rows")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", type=Path, help="update the ledger section of this Markdown file")
    args = parser.parse_args()
    rows = run(args.lines, args.runs)
    grown = growth(args.grow_to) if args.grow_to else []
    if args.json:
        print(json.dumps({"reads": rows, "growth": grown}, indent=2))
        return
    command = f"python -m bench.ledger --lines {args.lines} --runs {args.runs}"
    command += f" --grow-to {args.grow_to}" if args.grow_to else ""
    text = markdown(rows, grown, command + (f" --write {args.write}" if args.write else ""))
    print(text)
    if args.write:
        write_section(
            args.write, "<!-- bench:ledger:begin -->", "<!-- bench:ledger:end -->", text, "Reading the usage log"
        )


if __name__ == "__main__":
    main()
