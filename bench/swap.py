"""On-demand models: what a swap costs, and what the swap machinery adds to it.

`python -m bench.swap [--quick] [--json] [--write docs/performance.md]`

A `controller up` stack whose one (fake) GPU is a swap group of three llama.cpp models of the tiny demo GGUF,
one resident at a time (tests/e2e/swapping.py), measured side by side with the direct path in one run:
- **direct**: the worker's own command line run by hand: start to `/health` 200 (the backend's load), first
  streamed token, SIGTERM to exit (its unload);
- **cold swap**: a streamed request for the model not resident, through the chain (TLS, Envoy, the
  gatekeeper, the coordinator): time to its first token, split into the coordinator's own figures (unload of
  the resident model, load) and the rest; the machinery's overhead is that total less the direct unload and
  load and the chain's warm first token;
- **warm**: a resident on-demand model against a model that is not on demand, through the same chain;
- **burst**: 50 requests for the model not resident while the resident one streams 3000 tokens;
- **thrash**: three models on the one slot under a mixed pattern, with the thrash guard (min_resident_s) and
  without, loads per minute.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.report import machine, write_section

BEGIN, END = "<!-- bench:swap:begin -->", "<!-- bench:swap:end -->"
MIN_RESIDENT_S = 1.0


def log(line: str) -> None:
    print(f"[bench] {line}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def first_token_s(http: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, int]:
    """Seconds to the first content token of a streamed request, and how many content chunks came."""
    began = time.monotonic()
    first: float | None = None
    chunks = 0
    with http.stream("POST", url, json={**body, "stream": True}) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"{url}: {reply.status_code} {reply.read()[:300]!r}")
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                chunks += 1
                if first is None:
                    first = time.monotonic() - began
    if first is None:
        raise RuntimeError(f"{url}: no token came")
    return first, chunks


PROMPT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def direct(stack: Any, runs: int) -> dict[str, Any]:
    """The worker's own command, run by hand on a free port: load (start → /health 200), first token, unload."""
    from controller.local.processes import base_env, local_processes
    from controller.plan import make_plan
    from controller.secrets import read_worker_key
    from controller.spec import load_spec
    from tests.stubs import free_port

    plan = make_plan(load_spec(stack.spec))
    (spec,) = [p for p in local_processes(plan, stack.spec, stack.state) if p.name.startswith("swap-a-")]
    key = read_worker_key(stack.state.secrets)
    loads: list[float] = []
    firsts: list[float] = []
    unloads: list[float] = []
    unloads_open: list[float] = []
    for i in range(2 * runs):
        # Every other run an idle keep-alive connection stays open while the worker is stopped, as Envoy's health
        # checks and connection pools hold them in a stack.
        keep_open = i % 2 == 1
        port = free_port()
        argv = list(spec.argv)
        argv[argv.index("--port") + 1] = str(port)
        began = time.monotonic()
        proc = subprocess.Popen(
            argv,
            env={**base_env(), **spec.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        idle: httpx.Client | None = None
        try:
            while True:
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - began > 60:
                    raise RuntimeError("the worker did not load in 60 s")
                time.sleep(0.005)
            loads.append(time.monotonic() - began)
            http.headers["Authorization"] = f"Bearer {key}"
            firsts.append(first_token_s(http, "/v1/chat/completions", PROMPT)[0])
            if keep_open:
                # llama-server closes a connection after a stream, so the stream's own is gone; a plain request on a
                # client of its own leaves one open and idle.
                idle = httpx.Client(base_url=http.base_url, timeout=60)
                idle.get("/health").raise_for_status()
        finally:
            http.close()
            stopping = time.monotonic()
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
            (unloads_open if keep_open else unloads).append(time.monotonic() - stopping)
            if idle is not None:
                idle.close()
    return {
        "runs": runs,
        "load_ms": ms(statistics.median(loads)),
        "first_token_ms": ms(statistics.median(firsts)),
        "unload_ms": ms(statistics.median(unloads)),
        "unload_open_ms": ms(statistics.median(unloads_open)),
    }


def cold(stack: Any, runs: int, direct_figures: dict[str, Any]) -> dict[str, Any]:
    """A streamed request for the model not resident, while the other was resident (and idle) past its minimum."""
    from tests.e2e.swapping import api, chat, swap_worker

    rows = []
    with api(stack) as http:
        for i in range(runs):
            resident, wanted = ("swap-a", "swap-b") if i % 2 == 0 else ("swap-b", "swap-a")
            assert chat(stack, resident).status_code == 200
            time.sleep(MIN_RESIDENT_S + 0.3)
            total, _ = first_token_s(http, "/chat/completions", {**PROMPT, "model": wanted})
            last = swap_worker(stack, wanted)["last_load"]
            phases = swap_worker(stack, resident)["last_unload"]  # its eviction, phase by phase
            # The chain's own first token for the same model once resident and routed direct (Envoy has seen it).
            time.sleep(1.5)
            warm = statistics.median(
                first_token_s(http, "/chat/completions", {**PROMPT, "model": wanted})[0] for _ in range(3)
            )
            rows.append(
                {"total_s": total, "unload_s": last["unload_s"], "load_s": last["load_s"], "warm_s": warm, **phases}
            )
    total = statistics.median(r["total_s"] for r in rows)
    unload = statistics.median(r["unload_s"] for r in rows)
    load = statistics.median(r["load_s"] for r in rows)
    warm = statistics.median(r["warm_s"] for r in rows)
    # The backend's own unload as it is in a stack: with the idle keep-alive connections its clients hold.
    backend = (direct_figures["unload_open_ms"] + direct_figures["load_ms"]) / 1000
    overheads = [r["total_s"] - backend - r["warm_s"] for r in rows]
    # The coordinator's own part: the total less the worker's stop and start and the first token.
    own = [r["total_s"] - r["stop_s"] - direct_figures["load_ms"] / 1000 - r["warm_s"] for r in rows]
    return {
        "runs": runs,
        "total_ms": ms(total),
        "unload_ms": ms(unload),
        "load_ms": ms(load),
        "first_token_ms": ms(total - unload - load),
        "warm_first_token_ms": ms(warm),
        "overhead_ms": ms(statistics.median(overheads)),
        "overhead_max_ms": ms(max(overheads)),
        "evict_mark_ms": ms(statistics.median(r["mark_s"] for r in rows)),
        "evict_out_of_rotation_ms": ms(statistics.median(r["out_of_rotation_s"] for r in rows)),
        "evict_drained_ms": ms(statistics.median(r["drained_s"] for r in rows)),
        "evict_stop_ms": ms(statistics.median(r["stop_s"] for r in rows)),
        "own_overhead_ms": ms(statistics.median(own)),
        "own_overhead_max_ms": ms(max(own)),
    }


def warm(stack: Any, requests: int) -> dict[str, Any]:
    """A resident on-demand model (routed Envoy → worker) against tiny-chat, which is not on demand."""
    from tests.e2e.swapping import api, chat

    assert chat(stack, "swap-a").status_code == 200
    time.sleep(1.5)  # Envoy's health check has seen it resident
    out: dict[str, Any] = {}
    with api(stack) as http:
        for model in ("swap-a", "tiny-chat", "swap-a", "tiny-chat"):  # interleaved halves, so drift hits both
            times = out.setdefault(model, [])
            for _ in range(requests // 2):
                began = time.monotonic()
                reply = http.post("/chat/completions", json={**PROMPT, "model": model, "max_tokens": 2})
                assert reply.status_code == 200, reply.text
                times.append(time.monotonic() - began)
    return {
        model: {"requests": len(t), "p50_ms": ms(pct(t, 0.5)), "p99_ms": ms(pct(t, 0.99))} for model, t in out.items()
    }


def burst(stack: Any, size: int) -> dict[str, Any]:
    """``size`` requests for swap-b (not resident) while swap-a, resident, streams 3000 tokens."""
    from tests.e2e.swapping import api, chat, swap_worker

    assert chat(stack, "swap-a").status_code == 200
    time.sleep(MIN_RESIDENT_S + 0.3)
    loads_before = swap_worker(stack, "swap-b")["loads"]
    streamed: dict[str, Any] = {}
    started = threading.Event()

    def stream() -> None:
        finish = None
        tokens = 0
        with (
            api(stack) as http,
            http.stream(
                "POST",
                "/chat/completions",
                json={**PROMPT, "model": "swap-a", "max_tokens": 3000, "ignore_eos": True, "stream": True},
            ) as reply,
        ):
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                    if choice.get("delta", {}).get("content"):
                        tokens += 1
                        started.set()
                    finish = choice.get("finish_reason") or finish
        streamed.update(tokens=tokens, finish=finish)

    with concurrent.futures.ThreadPoolExecutor(size + 1) as pool:
        streaming = pool.submit(stream)
        started.wait(30)
        began = time.monotonic()

        def one(_: int) -> tuple[int, float]:
            t0 = time.monotonic()
            return chat(stack, "swap-b").status_code, time.monotonic() - t0

        answers = list(pool.map(one, range(size)))
        streaming.result(120)
    statuses = [s for s, _ in answers]
    return {
        "requests": size,
        "failed": sum(1 for s in statuses if s != 200),
        "loads": swap_worker(stack, "swap-b")["loads"] - loads_before,
        "stream_tokens": streamed.get("tokens"),
        "stream_finish": streamed.get("finish"),
        "stream_interrupted": streamed.get("finish") != "length",
        "slowest_ms": ms(max(t for _, t in answers)),
        "wall_ms": ms(time.monotonic() - began),
    }


def thrash(tmp: Path, guard_s: float, seconds: float, clients: int) -> dict[str, Any]:
    """Three models on the one slot, ``clients`` clients each asking for one at random (weights 5:3:2) one request
    after another; with the thrash guard at ``guard_s`` (0: none)."""
    from tests.e2e.swapping import MODELS, api, swap_stack, swap_worker

    # No per-user limit here (one user sends it all): what the thrash guard alone does.
    with swap_stack(tmp, min_resident_s=guard_s, not_swappable=(), user_swaps_per_hour=100_000) as stack:
        before = sum(swap_worker(stack, m)["loads"] for m in MODELS)
        statuses: list[int] = []
        times: list[float] = []
        lock = threading.Lock()
        stop = time.monotonic() + seconds

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with api(stack) as http:
                while time.monotonic() < stop:
                    model = rng.choices(MODELS, weights=(5, 3, 2))[0]
                    t0 = time.monotonic()
                    status = http.post(
                        "/chat/completions", json={**PROMPT, "model": model, "max_tokens": 2}
                    ).status_code
                    with lock:
                        statuses.append(status)
                        times.append(time.monotonic() - t0)
                    time.sleep(rng.uniform(0.05, 0.3))

        began = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
        took = time.monotonic() - began
        loads = sum(swap_worker(stack, m)["loads"] for m in MODELS) - before
    return {
        "min_resident_s": guard_s,
        "seconds": round(took, 1),
        "requests": len(statuses),
        "failed": sum(1 for s in statuses if s != 200),
        "statuses": {str(code): statuses.count(code) for code in sorted(set(statuses))},
        "loads": loads,
        "loads_per_min": round(loads / took * 60, 1),
        "requests_per_load": round(len(statuses) / max(1, loads), 1),
        "p50_ms": ms(pct(times, 0.5)),
        "p99_ms": ms(pct(times, 0.99)),
    }


def run(quick: bool) -> dict[str, Any]:
    from tests.e2e.swapping import swap_stack

    tmp = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    with swap_stack(tmp / "main", min_resident_s=MIN_RESIDENT_S) as stack:
        log("stack up; direct path")
        d = direct(stack, 2 if quick else 5)
        log(f"direct {d}; cold swaps")
        c = cold(stack, 2 if quick else 8, d)
        log(f"cold {c}; warm")
        w = warm(stack, 20 if quick else 200)
        log(f"warm {w}; burst")
        b = burst(stack, 10 if quick else 50)
        log(f"burst {b}")
    seconds, clients = (8.0, 2) if quick else (60.0, 4)
    guarded = thrash(tmp / "guard", 5.0, seconds, clients)
    log(f"thrash with guard {guarded}")
    unguarded = thrash(tmp / "noguard", 0.0, seconds, clients)
    log(f"thrash without guard {unguarded}")
    return {
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "direct": d,
        "cold": c,
        "warm": w,
        "burst": b,
        "thrash": {"guard": guarded, "none": unguarded},
    }


def markdown(r: dict[str, Any], command: str) -> str:
    d, c, w, b, t = r["direct"], r["cold"], r["warm"], r["burst"], r["thrash"]
    lines = [
        BEGIN,
        f"Measured {r['date']} on {r['machine']} by `{command}`: one `controller up` stack, its one (fake) GPU a swap "
        "group of three llama.cpp models of the tiny demo GGUF, one resident at a time; llama.cpp loads by starting "
        "the worker and unloads by stopping it. Medians unless said.",
        "",
        "| cold swap, streamed request | ms |",
        "|---|---|",
        f"| time to first token, through the chain | {c['total_ms']} |",
        f"| of which the coordinator's unload of the resident model (drain, stop) | {c['unload_ms']} |",
        f"| of which its load (start to `/health` 200) | {c['load_ms']} |",
        f"| the rest: first token and the chain | {c['first_token_ms']} |",
        f"| direct, by hand: unload (SIGTERM to exit; with an idle keep-alive connection open, as in a stack) / "
        f"load (start to `/health` 200) / first token | {d['unload_ms']} ({d['unload_open_ms']}) / {d['load_ms']} / "
        f"{d['first_token_ms']} |",
        f"| the chain's first token once resident (warm) | {c['warm_first_token_ms']} |",
        f"| swap overhead: total − direct unload (connection open) − direct load − warm first token "
        f"(worst of {c['runs']}) | {c['overhead_ms']} ({c['overhead_max_ms']}) |",
        f"| the eviction by phase: DRAINING mark / out of Envoy's rotation / requests done / the worker's stop "
        f"(SIGTERM to exit, through the supervisor) | {c['evict_mark_ms']} / {c['evict_out_of_rotation_ms']} / "
        f"{c['evict_drained_ms']} / {c['evict_stop_ms']} |",
        f"| **the coordinator's own overhead**: total − the worker's stop (as measured in the stack) − direct load − "
        f"warm first token (worst) | **{c['own_overhead_ms']}** ({c['own_overhead_max_ms']}) |",
        "",
        "| warm, non-streamed, 2 tokens | requests | p50 ms | p99 ms |",
        "|---|---|---|---|",
        *(
            f"| {name} ({'on demand, resident' if name.startswith('swap') else 'not on demand'}) | {v['requests']} | "
            f"{v['p50_ms']} | {v['p99_ms']} |"
            for name, v in w.items()
        ),
        "",
        f"Burst: {b['requests']} requests for the model not resident while the resident one streamed 3000 tokens: "
        f"{b['failed']} failed, {b['loads']} load, the stream {'interrupted' if b['stream_interrupted'] else 'whole'} "
        f"({b['stream_tokens']} tokens, finish `{b['stream_finish']}`), the slowest answered after {b['slowest_ms']} ms "
        "(it waited for the stream, then the load).",
        "",
        "| thrash: 3 models on 1 slot, mixed requests | min_resident_s | requests | failed | loads/min | "
        "requests per load | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {label} | {v['min_resident_s']:g} | {v['requests']} | {v['failed']} | {v['loads_per_min']} | "
            f"{v['requests_per_load']} | {v['p50_ms']} | {v['p99_ms']} |"
            for label, v in (("with the thrash guard", t["guard"]), ("without", t["none"]))
        ),
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.swap", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (the test suite's)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", type=Path, help="replace this benchmark's section of a Markdown file")
    args = parser.parse_args()
    result = run(args.quick)
    command = "python -m bench.swap" + (" --quick" if args.quick else "")
    if args.write:
        write_section(args.write, BEGIN, END, markdown(result, command), "On-demand models (swapping)")
    print(json.dumps(result, indent=2) if args.json else markdown(result, command))


if __name__ == "__main__":
    main()
