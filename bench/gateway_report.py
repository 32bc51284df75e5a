"""The gateway benchmark's report: medians over runs, the targets, and the Markdown in docs/performance.md."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.load import STALL_S, WARM_S, Settings
from bench.paths import TEAM_KEYS, TEAM_USERS
from bench.report import write_section

MARK_BEGIN = "<!-- bench:gateway:begin -->"
MARK_END = "<!-- bench:gateway:end -->"
GATEWAY = ("caddy", "envoy", "gatekeeper")  # the chain's processes in the request path
ROLE = {"stub": "the backend", "supervisor": "not in the request path", "agent": "not in the request path"}


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
    keys64 = summary.get("chain-keys", {}).get("closed", {}).get("64")
    if c64 and keys64:
        # Per run: the many-keys path against the one-key path of the same run (they alternate on one stack).
        ratios = [k / max(o, 1e-9) for k, o in zip(keys64["rps"], c64["rps"], strict=True)]
        worst = min(ratios)
        out.append(
            (
                f"{TEAM_KEYS} keys of {TEAM_USERS} users with rpm and daily_tokens: req/s at c=64 within 15 % of one "
                "key's",
                f"{100 * (_med(ratios) or 0):.0f} % of it (median), {100 * worst:.0f} % (worst run)",
                (_med(ratios) or 0) >= 0.85,
            )
        )
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
    lines += [
        "Paths: **direct** is the stub backend itself; **chain** the whole gateway (TLS, Envoy, its Lua filter, "
        "the gatekeeper's answers) with one key of a user without limits; **chain-keys** the same chain with "
        f"{TEAM_KEYS} keys of {TEAM_USERS} users who each have `rpm` and `daily_tokens` (limits large enough "
        "never to refuse the benchmark, so what they cost is measured, not refusals), a different key on each "
        "request; **envoy-only** Envoy's plain-HTTP listener with one key (no TLS), a breakdown. Each path gets "
        f"{data['settings'].get('warm_s', WARM_S):g} s of load before it is measured, so every key's answer is "
        "held by each Envoy worker thread, as in a gateway that has been up a while. CPU is read after the "
        "gatekeeper has recorded each point's usage lines in its ledger, so that work is counted in its point.",
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
