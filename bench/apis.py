"""Benchmark: OpenAI's Responses and Anthropic's Messages through the gateway, beside Chat Completions.

One `controller up` stack whose model is the stub (bench/stub.py) run as a llama.cpp worker (a `llama-server`
shim on PATH execs it: `controller up`'s llama-server serves all three routes, so the gateway passes them). The
stub answers each route with the same fixed answer in that API's shape, from an Envoy `direct_response`, so
what differs between the routes is the gateway's own work: the Lua filter reading the body, the usage read
from the answer in that API's names, the ledger. Requests carry a real API key (a bearer token for chat and
Responses, `x-api-key` for Messages, as each API's clients send it); each route is also measured on the stub
directly (the direct path).

Load: wrk (closed loop, keep-alive, one thread), c = 1 (latency p50 / p99) and c = 64 (req/s), the routes taken
in turn within each run so that drift on the machine falls on all of them alike; medians over the runs.

    python -m bench.apis [--runs 3] [--seconds 8] [--json] [--write docs/performance.md] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.load import CHAT, MODEL, Target, wrk
from bench.paths import ROOT, ledger_settled
from bench.report import machine, publish

SECTION = ("<!-- bench:apis:begin -->", "<!-- bench:apis:end -->", "Responses and Messages beside Chat Completions")
# Each route with the body its clients send for the same short answer, and how they send the key.
ROUTES: dict[str, tuple[str, dict[str, Any], str]] = {
    "chat": ("/chat/completions", CHAT, "authorization"),
    "responses": ("/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 16}, "authorization"),
    "messages": (
        "/messages",
        {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
        "x-api-key",
    ),
}
TARGET_PCT = 10  # Responses and Messages within this much of chat: p50 and p99 at c=1, req/s at c=64


def stub_as_llamacpp(data: dict[str, Any]) -> None:
    """The demo fleet with the stub as its one model: a llama.cpp worker (its gguf is never read)."""
    data["models"] = [
        {
            "name": MODEL,
            "backend": "llamacpp",
            "device": "cpu",
            "source": {"gguf": "bench-stub.gguf"},
            "context": 2048,
            "parallel": 256,  # Envoy's circuit breakers allow 2 × parallel connections: room for c=64
            "arch": {"layers": 1, "kv_heads": 1, "head_dim": 8, "params_b": 0.001},
        }
    ]


@contextmanager
def api_stack(tmp: Path) -> Iterator[tuple[Target, Target]]:
    """(the stub directly, the chain) for a stack whose llama.cpp worker is the stub."""
    from tests.e2e.stack import start_stack, stop_stack

    bin_dir = tmp / "bin"
    bin_dir.mkdir(parents=True)
    shim = bin_dir / "llama-server"
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m bench.stub serve "$@"\n')
    shim.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    stack = start_stack(tmp / "stack", stub_as_llamacpp, env=env)
    try:
        procs = stack.processes()
        (worker,) = [p for p in procs.values() if p["kind"] == "worker"]
        gateway = {kind: p["pid"] for p in procs.values() if (kind := p["kind"]) in ("envoy", "gatekeeper")}
        stub = {"stub": worker["pid"]}
        settle = ledger_settled(stack.state.usage_log, stack.state.gatekeeper / "usage.db")
        direct = Target("direct", f"http://127.0.0.1:{worker['ports'][0]}/v1", processes=stub)
        chain = Target("chain", stack.base_url, stack.key, processes=gateway, others=stub, settle=settle)
        yield direct, chain
    finally:
        stop_stack(stack)


def run(runs: int, seconds: float, warm: bool = True) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-apis-"))
    points: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        with api_stack(tmp) as (direct, chain):
            for target in (direct, chain) if warm else ():  # TLS sessions, the gatekeeper's answer for the key
                for route, body, header in ROUTES.values():
                    wrk(target, 8, 1, route, body, header)
            for i in range(runs):
                for name, (route, body, header) in ROUTES.items():
                    for target in (direct, chain):
                        print(f"[bench] run {i + 1}/{runs}: {target.name} {name}", file=sys.stderr, flush=True)
                        one = points.setdefault(target.name, {}).setdefault(name, [])
                        one.append({f"c{c}": wrk(target, c, seconds, route, body, header) for c in (1, 64)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"machine": machine(), "runs": runs, "seconds": seconds, "points": points, "summary": summarize(points)}


def summarize(points: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    def med(target: str, api: str, c: str, field: str) -> float:
        return round(float(statistics.median(run[c][field] for run in points[target][api])), 3)

    out: dict[str, Any] = {}
    for target, apis in points.items():
        out[target] = {
            api: {
                "p50_ms": med(target, api, "c1", "p50_ms"),
                "p99_ms": med(target, api, "c1", "p99_ms"),
                "rps_c64": med(target, api, "c64", "rps"),
                "errors": sum(run[c]["errors"] for run in points[target][api] for c in ("c1", "c64")),
                "cpu_us_per_req": {
                    k: statistics.median(run["c64"]["cpu_us_per_req"][k] for run in points[target][api])
                    for k in points[target][api][0]["c64"]["cpu_us_per_req"]
                },
            }
            for api in apis
        }
    chain = out.get("chain", {})
    if "direct" in points:
        # What the gateway adds: per run, the chain's latency less the direct path's, measured back to back.
        for api, v in chain.items():
            for q in ("p50", "p99"):
                added = [
                    c["c1"][f"{q}_ms"] - d["c1"][f"{q}_ms"]
                    for c, d in zip(points["chain"][api], points["direct"][api], strict=True)
                ]
                v[f"added_{q}_ms"] = round(float(statistics.median(added)), 3)
    if "chat" in chain:
        chat = chain["chat"]

        def pct(v: dict[str, Any], key: str) -> float | None:
            return round(100 * (v[key] / chat[key] - 1), 1) if key in v and chat.get(key) else None

        out["vs_chat_pct"] = {
            api: {
                "p50": pct(v, "p50_ms"),
                "p99": pct(v, "p99_ms"),
                "added_p50": pct(v, "added_p50_ms"),
                "added_p99": pct(v, "added_p99_ms"),
                "rps_c64": pct(v, "rps_c64"),
            }
            for api, v in chain.items()
            if api != "chat"
        }
    return out


def met(vs: dict[str, float | None]) -> bool:
    """Within TARGET_PCT of chat, as the issue puts it: the latency the gateway adds (p50, p99 at c=1) no more
    than that much higher, req/s at c=64 no more than that much lower."""
    added = [vs.get("added_p50"), vs.get("added_p99")]
    rps = vs["rps_c64"]
    return all(a is not None and a <= TARGET_PCT for a in added) and rps is not None and rps >= -TARGET_PCT


def markdown(data: dict[str, Any], command: str) -> str:
    s = data["summary"]
    lines = [
        SECTION[0],
        f"Measured with `{command}` on {data['machine']}, "
        f"{data['runs']} runs of {data['seconds']:g} s per point; medians. The stub answers each route with the "
        "same answer in that API's shape; the chain is Envoy (TLS, the Lua filter, the key's kept answer), the "
        "usage read in each API's names and the ledger.",
        "",
        "| route | path | p50 c=1 (ms) | p99 c=1 (ms) | added p50 (ms) | added p99 (ms) | req/s c=64 "
        "| gateway CPU/req c=64 (µs) | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for api, (route, _, header) in ROUTES.items():
        for target in ("direct", "chain"):
            v = s[target][api]
            cpu = sum(v["cpu_us_per_req"].values()) if target == "chain" else None
            added = [f"{v[k]:.3f}" if k in v else "—" for k in ("added_p50_ms", "added_p99_ms")]
            lines.append(
                f"| `/v1{route}` ({'x-api-key' if header == 'x-api-key' else 'bearer'}) | {target} | "
                f"{v['p50_ms']:.3f} | {v['p99_ms']:.3f} | {added[0]} | {added[1]} | {v['rps_c64']:.0f} | "
                f"{'' if cpu is None else f'{cpu:.0f}'} | {v['errors']} |"
            )
    lines += [
        "",
        "Added: per run, the chain's latency less the direct path's (measured back to back), then the median.",
        f"Target: Responses and Messages within {TARGET_PCT} % of chat, in the latency the gateway adds (p50, p99 "
        "at c=1) and in req/s at c=64; the chain's whole latency is given too:",
        "",
    ]

    def signed(x: float | None) -> str:
        return "—" if x is None else f"{x:+.1f} %"

    for api, vs in s.get("vs_chat_pct", {}).items():
        verdict = "met" if met(vs) else "**missed**"
        lines.append(
            f"- `{api}` against chat: added p50 {signed(vs['added_p50'])}, added p99 {signed(vs['added_p99'])}, "
            f"req/s at c=64 {signed(vs['rps_c64'])}: {verdict} (the chain's p50 {signed(vs['p50'])}, "
            f"p99 {signed(vs['p99'])})"
        )
    return "\n".join([*lines, SECTION[1]])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.apis", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--quick", action="store_true", help="1 run of 1 s per point, no warm-up (a smoke run)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", type=Path, help="replace this section of a markdown file (docs/performance.md)")
    args = parser.parse_args()
    runs, seconds = (1, 1.0) if args.quick else (args.runs, args.seconds)
    data = run(runs, seconds, warm=not args.quick)
    publish(data, markdown, prog="bench.apis", as_json=args.json, write=args.write, section=SECTION)


if __name__ == "__main__":
    main()
