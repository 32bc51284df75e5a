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
- **litellm**: LiteLLM's proxy from PyPI, pinned, installed by ``bench/setup-litellm`` into
  ``bench/.venv-litellm`` (a bench setup step, not part of the test suite's install), 2 workers,
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
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.gateway_report import markdown, summarize, write
from bench.load import QUICK, WARM_CONNECTIONS, Conn, Settings, Target, open_loop, stream_latency, stream_level, wrk
from bench.paths import LITELLM, _litellm_version, chain_stack, litellm_proxy
from bench.report import machine

LITELLM_FAILED = "LiteLLM is installed but could not be started"
LITELLM_MISSING = "LiteLLM is not installed"


# -- one run ------------------------------------------------------------------------------------


def measure(target: Target, s: Settings) -> dict[str, Any]:
    wrk(target, WARM_CONNECTIONS, s.warm_s)
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
    results: dict[str, list[dict[str, Any]]] = {
        "direct": [],
        "envoy-only": [],
        "chain": [],
        "chain-keys": [],
        "litellm": [],
    }
    with chain_stack(tmp) as (direct, chain, team, envoy_only):
        litellm = None
        lite_ctx = None
        if with_litellm and LITELLM.exists():
            lite_ctx = litellm_proxy(tmp, direct.url)
            try:
                litellm = lite_ctx.__enter__()
                notes.append(f"LiteLLM {_litellm_version()} (PyPI, `bench/.venv-litellm`), 2 workers, no database.")
            except RuntimeError as exc:
                notes.append(f"{LITELLM_FAILED}: {exc}")
                lite_ctx = None
        elif with_litellm:
            notes.append(f"{LITELLM_MISSING} ({LITELLM} missing: run `bench/setup-litellm`, once); skipped")
        else:
            notes.append("LiteLLM skipped (--no-litellm)")
        try:
            for i in range(runs):
                for target in (direct, envoy_only, chain, team, litellm):
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
