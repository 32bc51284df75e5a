"""The gateway's monitoring, checked by the programs that consume it.

- `promtool check config` / `check rules` on the rendered Prometheus files;
- `promtool test rules`: every alert fires on input series written for it
  here, and stays quiet on a near miss; an alert without a case fails;
- `amtool check-config` on the rendered Alertmanager file;
- Grafana: the provisioning files' shape, and every panel query parsed by
  promtool and made of metric names from the contract below (or the rules'
  own recording rules).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.plan import Plan
from controller.plan.models import Worker
from controller.render.containers import ENGINE_SOCKET, Container, host_containers
from controller.render.envoy import model_cluster, worker_cluster
from controller.render.prometheus import WORKER_KEY_FILE, has_agent
from controller.secrets import ensure_worker_secret
from tests.conftest import need_tool, run

pytestmark = pytest.mark.contract

PROMTOOL_HINT = "install Debian's prometheus package (scripts/bootstrap does)"
AMTOOL_HINT = "install Debian's prometheus-alertmanager package (scripts/bootstrap does)"

# The metric names the agent, the gatekeeper, Envoy and the workers export (issue 5).
CONTRACT = frozenset(
    """
fleet_gpu_utilization_ratio fleet_gpu_memory_used_bytes fleet_gpu_memory_total_bytes fleet_gpu_power_watts
fleet_gpu_power_limit_watts fleet_gpu_temperature_celsius fleet_gpu_sm_clock_hertz fleet_gpu_memory_clock_hertz
fleet_gpu_throttle_active fleet_gpu_ecc_errors_total fleet_gpu_process_memory_bytes fleet_worker_pinning
fleet_gpu_unmanaged_processes fleet_worker_up fleet_worker_model_missing fleet_worker_memory_measured_bytes
fleet_worker_memory_estimate_bytes fleet_worker_memory_estimate_miss_ratio fleet_worker_health_latency_seconds fleet_agent_nvml_up
fleet_gatekeeper_decisions_total fleet_tokens_total fleet_usage_requests_total fleet_ledger_last_ingest_timestamp_seconds
envoy_cluster_upstream_rq_total envoy_cluster_upstream_rq_xx envoy_cluster_upstream_rq_time_bucket
envoy_cluster_upstream_rq_time_sum envoy_cluster_upstream_rq_time_count envoy_cluster_upstream_rq_active
envoy_cluster_upstream_rq_pending_active envoy_cluster_upstream_rq_pending_overflow envoy_cluster_membership_healthy
envoy_cluster_membership_total
llamacpp:requests_processing llamacpp:requests_deferred llamacpp:prompt_tokens_total llamacpp:tokens_predicted_total
vllm:num_requests_running vllm:num_requests_waiting vllm:kv_cache_usage_perc vllm:prompt_tokens_total
vllm:generation_tokens_total vllm:time_to_first_token_seconds_bucket vllm:e2e_request_latency_seconds_bucket
""".split()
)
# Alerts may also read Prometheus's own `up`, and the certificate expiry that a
# fleet service exports (no consumer here exports one; see rules.py).
# Inventory series a plan may have none of (no on-demand worker, no host with GPUs): the rules still name them, and
# Prometheus reads a series no rule records as empty.
ALERT_EXTRAS = frozenset(
    {"up", "fleet_tls_cert_expiry_timestamp_seconds", "fleet:worker_on_demand_info", "fleet:host_gpu_info"}
)

# -- reading PromQL -------------------------------------------------------------------

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
KEYWORDS |= {"inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NUMBER = re.compile(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions, keywords or labels."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        rest = text[m.end() :].lstrip()
        if m.group() in KEYWORDS or rest.startswith("("):
            continue
        names.add(m.group())
    return names


def test_metric_names_reads_promql() -> None:
    expr = (
        'sum by (model) (rate(a:b_total{x="y (z)", le="1e3"}[5m]) * on (c) group_left (d) info) '
        "/ 1000 > 0.5 and on (model) up == 0 or vector(1) unless histogram_quantile(0.9, e_bucket)"
    )
    assert metric_names(expr) == {"a:b_total", "info", "up", "e_bucket"}


# -- helpers ---------------------------------------------------------------------------


def gateway(rendered: Path, plan: Plan) -> Path:
    return rendered / plan.fleet.gateway.host


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rule_groups(rendered: Path, plan: Plan) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = load(gateway(rendered, plan) / "prometheus" / "rules.yml")["groups"]
    return groups


def alert_rules(rendered: Path, plan: Plan) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule_groups(rendered, plan) for r in g["rules"] if "alert" in r}


def recorded(rendered: Path, plan: Plan) -> set[str]:
    return {r["record"] for g in rule_groups(rendered, plan) for r in g["rules"] if "record" in r}


def promtool_parses(promtool: str, exprs: list[str], folder: Path) -> None:
    """Each expression as a throwaway recording rule, parsed by `promtool check rules`."""
    doc = {
        "groups": [{"name": "check", "rules": [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)]}]
    }
    path = folder / "exprs.rules.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=1000))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


# -- Prometheus ----------------------------------------------------------------------


def test_promtool_check_config_and_rules(rendered: Path, example_plan: Plan, tmp_path: Path) -> None:
    promtool = need_tool("promtool", PROMTOOL_HINT)
    folder = gateway(rendered, example_plan) / "prometheus"
    # promtool opens the worker secret's file; point it at one that exists here (the only change).
    config = folder / "prometheus.yml"
    text = config.read_text()
    assert f"credentials_file: {WORKER_KEY_FILE}" in text
    key_file = ensure_worker_secret(tmp_path / "secrets")
    config.write_text(text.replace(WORKER_KEY_FILE, str(key_file)))
    result = run([promtool, "check", "config", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr  # rules.yml resolved beside the config
    result = run([promtool, "check", "rules", str(folder / "rules.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_targets_cover_the_fleet(rendered: Path, example_plan: Plan) -> None:
    plan = example_plan
    gw = plan.fleet.gateway
    doc = load(gateway(rendered, plan) / "prometheus" / "prometheus.yml")
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert jobs["envoy"]["static_configs"] == [{"targets": [f"127.0.0.1:{gw.ports.envoy_admin}"]}]
    assert jobs["gatekeeper"]["static_configs"] == [{"targets": [f"127.0.0.1:{gw.ports.gatekeeper}"]}]
    workers = {c["labels"]["worker"]: c for c in jobs["workers"]["static_configs"]}
    for w in plan.workers:
        if w.backend == "ollama":
            assert w.name not in workers  # no metrics endpoint
            continue
        assert workers[w.name]["targets"] == [f"{w.address}:{w.port}"]
        assert workers[w.name]["labels"] == {"worker": w.name, "model": w.model, "host": w.host, "backend": w.backend}
    agents = {c["labels"]["host"]: c["targets"] for c in jobs["agents"]["static_configs"]}
    assert agents == {
        h.name: [f"{h.address}:{h.agent_port}"] for h in plan.fleet.hosts or [] if has_agent(plan, h.name)
    }
    alertmanager = f"127.0.0.1:{plan.fleet.gateway.ports.alertmanager}"
    assert doc["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [alertmanager]


def test_every_alert_has_severity_summary_and_runbook(rendered: Path, example_plan: Plan) -> None:
    runbook = (gateway(rendered, example_plan) / "prometheus" / "RUNBOOK.md").read_text()
    sections = {line[3:].strip().lower() for line in runbook.splitlines() if line.startswith("## ")}
    rules = alert_rules(rendered, example_plan)
    assert rules
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert {"summary", "runbook"} <= set(rule["annotations"]), name
        path, anchor = rule["annotations"]["runbook"].split("#")
        assert path == "/etc/fleet/prometheus/RUNBOOK.md" and anchor in sections, f"{name}: no runbook section"


def test_rules_read_only_contract_metrics(rendered: Path, example_plan: Plan) -> None:
    allowed = CONTRACT | ALERT_EXTRAS | recorded(rendered, example_plan)
    for group in rule_groups(rendered, example_plan):
        for rule in group["rules"]:
            unknown = metric_names(rule["expr"]) - allowed
            assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown} not in the metric contract"


# -- firing every alert ----------------------------------------------------------------

EVAL = "45m"  # after every alert's `for`
SAMPLES = "x60"  # one sample a minute for an hour


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    body = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def flat(value: float) -> str:
    return f"{num(value)}{SAMPLES}"


def rising(per_minute: float) -> str:
    return f"0+{num(per_minute)}{SAMPLES}"


@dataclass
class Case:
    labels: dict[str, str]  # the alert's labels besides alertname and severity
    fire: list[dict[str, str]]
    calm: list[dict[str, str]]  # a near miss: the alert must not fire
    silent: bool = False  # the plan rules the alert out for these labels (an on-demand worker): ``fire`` is quiet too


class Fleet:
    """Label sets of real targets of the example, for input series."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.t = plan.fleet.observability.thresholds
        gw = plan.fleet.gateway
        self.envoy = {"job": "envoy", "instance": f"127.0.0.1:{gw.ports.envoy_admin}"}
        self.gatekeeper = {"job": "gatekeeper", "instance": f"127.0.0.1:{gw.ports.gatekeeper}"}
        on_demand = {w.name for w in plan.on_demand()}
        # On-demand workers are never "down" (unloaded looks the same): a resident one, where the plan has one.
        self.worker = next((w for w in plan.workers if w.name not in on_demand), plan.workers[0])
        self.worker_on_demand = self.worker.name in on_demand
        self.vllm = next((w for w in plan.workers if w.backend == "vllm"), self.worker)
        self.gpu = plan.gpus[0].gpu
        self.gpu_key = {"host": self.gpu.host, "index": str(self.gpu.index), "uuid": self.gpu.uuid}
        self.gpu_series = {**self.agent(self.gpu.host), **self.gpu_key, "name": self.gpu.name}

    def agent(self, host: str) -> dict[str, str]:
        h = self.plan.host(host)
        return {"job": "agents", "instance": f"{h.address}:{h.agent_port}", "host": host}

    def target(self, w: Worker) -> dict[str, str]:
        return {
            "job": "workers",
            "instance": f"{w.address}:{w.port}",
            "worker": w.name,
            "model": w.model,
            "host": w.host,
            "backend": w.backend,
        }

    def cluster(self, name: str) -> dict[str, str]:
        return {**self.envoy, "envoy_cluster_name": name}

    def throttle(self, thermal: int, power_cap: int, hw_slowdown: int = 0) -> list[dict[str, str]]:
        return [
            series("fleet_gpu_throttle_active", {**self.gpu_series, "reason": "thermal"}, flat(thermal)),
            series("fleet_gpu_throttle_active", {**self.gpu_series, "reason": "power_cap"}, flat(power_cap)),
            series("fleet_gpu_throttle_active", {**self.gpu_series, "reason": "hw_slowdown"}, flat(hw_slowdown)),
        ]

    def memory(self, w: Worker, on: int, miss: float) -> list[dict[str, str]]:
        """A GPU worker's memory series: booked on its GPUs, held on ``on`` GPUs, ``miss`` from its estimate."""
        labels = {**self.agent(w.host), "worker": w.name}
        booked = round(w.footprint_gib * 2**30)
        gpus = [g.uuid for g in w.gpus] + [
            g.gpu.uuid for g in self.plan.gpus if g.gpu.uuid not in {x.uuid for x in w.gpus}
        ]
        return [
            *(series("fleet_worker_memory_estimate_bytes", {**labels, "gpu": g.uuid}, flat(booked)) for g in w.gpus),
            *(series("fleet_worker_memory_measured_bytes", {**labels, "gpu": u}, flat(booked)) for u in gpus[:on]),
            series("fleet_worker_memory_estimate_miss_ratio", labels, flat(miss)),
        ]

    def pinning(self, state: str) -> list[dict[str, str]]:
        w = self.worker
        labels = {**self.agent(w.host), "worker": w.name, "model": w.model}
        return [
            series("fleet_worker_pinning", {**labels, "state": s}, flat(1 if s == state else 0))
            for s in ("ok", "wrong_gpu", "not_found")
        ]

    def histogram(self, name: str, labels: dict[str, str], scale: float, slow: bool) -> list[dict[str, str]]:
        """Ten requests a minute, all below half of ``scale`` or all between it and twice it."""
        out = []
        for le in (scale / 2, scale, scale * 2, math.inf):
            count = 10 if (le >= scale * 2 if slow else True) else 0
            out.append(series(name, {**labels, "le": "+Inf" if le == math.inf else num(le)}, rising(count)))
        return out

    def responses(self, model: str, share_5xx: float) -> list[dict[str, str]]:
        five = round(100 * share_5xx)
        labels = self.cluster(model_cluster(model))
        return [
            series("envoy_cluster_upstream_rq_xx", {**labels, "envoy_response_code_class": "2"}, rising(100 - five)),
            series("envoy_cluster_upstream_rq_xx", {**labels, "envoy_response_code_class": "5"}, rising(five)),
        ]


def cases(plan: Plan) -> dict[str, Case]:
    f = Fleet(plan)
    t, w, v, gpu = f.t, f.worker, f.vllm, f.gpu_series
    worker_key = {"worker": w.name, "model": w.model, "host": w.host}
    total = 24 * 2**30

    def worker_down(up: int) -> list[dict[str, str]]:
        agent_up = {**f.agent(w.host), "worker": w.name, "model": w.model}
        return [
            series("envoy_cluster_membership_healthy", f.cluster(worker_cluster(w.name)), flat(up)),
            series("fleet_worker_up", agent_up, flat(up)),
        ]

    def model_health(healthy: int) -> list[dict[str, str]]:
        labels = f.cluster(model_cluster(w.model))
        return [
            series("envoy_cluster_membership_healthy", labels, flat(healthy)),
            series("envoy_cluster_membership_total", labels, flat(2)),
        ]

    def queue(running: int, pending: int) -> list[dict[str, str]]:
        return [
            series("vllm:num_requests_running", f.target(v), flat(running)),
            series("vllm:num_requests_waiting", f.target(v), flat(0)),
            series("envoy_cluster_upstream_rq_pending_active", f.cluster(model_cluster(v.model)), flat(pending)),
        ]

    def up(labels: dict[str, str], value: int) -> list[dict[str, str]]:
        return [series("up", labels, flat(value))]

    def cert(days: float) -> list[dict[str, str]]:
        labels = {**f.gatekeeper, "domain": plan.fleet.gateway.public_name}
        return [series("fleet_tls_cert_expiry_timestamp_seconds", labels, flat(2700 + days * 86400))]

    # Caddy's internal CA issues 12-hour certificates: there the alert means less than an hour left.
    internal = plan.fleet.gateway.tls.mode == "internal"
    cert_firing = cert(0.5 / 24) if internal else cert(t.cert_expiry_days - 1)
    cert_quiet = cert(2 / 24) if internal else cert(t.cert_expiry_days + 1)

    on_gpu = next(x for x in plan.workers if len(x.gpus) == 1)
    on_gpu_key = {"worker": on_gpu.name, "host": on_gpu.host}

    def missing(value: int) -> list[dict[str, str]]:
        labels = {**f.agent(on_gpu.host), "worker": on_gpu.name, "model": on_gpu.model}
        return [series("fleet_worker_model_missing", labels, flat(value))]

    latency = "envoy_cluster_upstream_rq_time_bucket"
    ttft = "vllm:time_to_first_token_seconds_bucket"
    agent = f.agent(f.gpu.host)
    return {
        "FleetWorkerDown": Case(worker_key, worker_down(0), worker_down(1), silent=f.worker_on_demand),
        "FleetModelUnavailable": Case({"model": w.model}, model_health(0), model_health(1), silent=f.worker_on_demand),
        "FleetGpuThermalThrottling": Case(f.gpu_key, f.throttle(1, 0), f.throttle(0, 1)),
        "FleetGpuTemperatureHigh": Case(
            f.gpu_key,
            [series("fleet_gpu_temperature_celsius", gpu, flat(t.gpu_temp_c + 5))],
            [series("fleet_gpu_temperature_celsius", gpu, flat(t.gpu_temp_c - 1))],
        ),
        "FleetGpuPowerCapThrottling": Case(f.gpu_key, f.throttle(0, 1), f.throttle(1, 0)),
        "FleetGpuHardwareSlowdown": Case(f.gpu_key, f.throttle(0, 0, 1), f.throttle(1, 1, 0)),
        "FleetWorkerMemoryOnManyGpus": Case(on_gpu_key, f.memory(on_gpu, 2, 0.0), f.memory(on_gpu, 1, 0.0)),
        "FleetWorkerMemoryOffEstimate": Case(on_gpu_key, f.memory(on_gpu, 1, 0.3), f.memory(on_gpu, 1, -0.05)),
        "FleetWorkerModelMissing": Case(
            {"worker": on_gpu.name, "model": on_gpu.model, "host": on_gpu.host}, missing(1), missing(0)
        ),
        "FleetGpuMemoryNearlyFull": Case(
            f.gpu_key,
            [
                series("fleet_gpu_memory_total_bytes", gpu, flat(total)),
                series("fleet_gpu_memory_used_bytes", gpu, flat(round(total * (1 + t.vram_used_ratio) / 2))),
            ],
            [
                series("fleet_gpu_memory_total_bytes", gpu, flat(total)),
                series("fleet_gpu_memory_used_bytes", gpu, flat(round(total * t.vram_used_ratio * 0.95))),
            ],
        ),
        "FleetWorkerWrongGpu": Case(worker_key, f.pinning("wrong_gpu"), f.pinning("ok")),
        "FleetGpuUnmanagedProcess": Case(
            f.gpu_key,
            [series("fleet_gpu_unmanaged_processes", gpu, flat(1))],
            [series("fleet_gpu_unmanaged_processes", gpu, flat(0))],
        ),
        "FleetGpuEccErrors": Case(
            f.gpu_key,
            [
                series("fleet_gpu_ecc_errors_total", {**gpu, "type": "uncorrected"}, rising(1)),
                series("fleet_gpu_ecc_errors_total", {**gpu, "type": "corrected"}, flat(0)),
            ],
            [  # old uncorrected errors, and corrected ones, do not page
                series("fleet_gpu_ecc_errors_total", {**gpu, "type": "uncorrected"}, flat(3)),
                series("fleet_gpu_ecc_errors_total", {**gpu, "type": "corrected"}, rising(5)),
            ],
        ),
        "FleetModelQueueGrowing": Case(
            {"model": v.model}, queue(t.queue_depth, t.queue_depth), queue(t.queue_depth // 2, 0)
        ),
        "FleetModelLatencyHigh": Case(
            {"model": w.model},
            f.histogram(latency, f.cluster(model_cluster(w.model)), t.latency_p95_s * 1000, slow=True),
            f.histogram(latency, f.cluster(model_cluster(w.model)), t.latency_p95_s * 1000, slow=False),
        ),
        "FleetModelTimeToFirstTokenHigh": Case(
            {"model": v.model},
            f.histogram(ttft, f.target(v), t.ttft_p95_s, slow=True),
            f.histogram(ttft, f.target(v), t.ttft_p95_s, slow=False),
        ),
        "FleetModelErrorRateHigh": Case(
            {"model": w.model},
            f.responses(w.model, min(1.0, (1 + t.error_ratio) / 2)),
            f.responses(w.model, t.error_ratio / 2),
        ),
        "FleetGatekeeperDown": Case(f.gatekeeper, up(f.gatekeeper, 0), up(f.gatekeeper, 1)),
        "FleetEnvoyDown": Case(f.envoy, up(f.envoy, 0), up(f.envoy, 1)),
        "FleetAgentDown": Case(agent, up(agent, 0), up(agent, 1)),
        "FleetAgentNvmlDown": Case(
            {"host": f.gpu.host},
            [series("fleet_agent_nvml_up", agent, flat(0))],
            [series("fleet_agent_nvml_up", agent, flat(1))],
        ),
        "FleetTlsCertificateExpiring": Case({"domain": plan.fleet.gateway.public_name}, cert_firing, cert_quiet),
    }


_LABEL_REF = re.compile(r"\{\{ \$labels\.(\w+) \}\}")


def expand(template: str, labels: dict[str, str]) -> str:
    """What Prometheus makes of an annotation that uses only `{{ $labels.name }}`."""
    text = _LABEL_REF.sub(lambda m: labels[m.group(1)], template)
    assert "{{" not in text, f"annotation uses more than $labels: {template!r}"
    return text


def unit_tests(rules: dict[str, dict[str, Any]], plan: Plan) -> dict[str, Any]:
    tests = []
    for name, case in cases(plan).items():
        rule = rules[name]
        labels = {**case.labels, **rule["labels"]}
        annotations = {k: expand(v, labels) for k, v in rule["annotations"].items()}
        expected = [{"exp_labels": labels, "exp_annotations": annotations}]
        fired = [] if case.silent else expected
        for kind, inputs, alerts in (("fires", case.fire, fired), ("stays quiet", case.calm, [])):
            tests.append(
                {
                    "name": f"{name} {kind}",
                    "interval": "1m",
                    "input_series": inputs,
                    "alert_rule_test": [{"eval_time": EVAL, "alertname": name, "exp_alerts": alerts}],
                }
            )
    return {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "group_eval_order": ["fleet-inventory", "fleet-recording", "fleet-alerts"],
        "tests": tests,
    }


def test_every_alert_has_a_case(rendered: Path, example_plan: Plan) -> None:
    rules = alert_rules(rendered, example_plan)
    missing = sorted(set(rules) - set(cases(example_plan)))
    stale = sorted(set(cases(example_plan)) - set(rules))
    assert not missing, f"alerts without a firing and a quiet case in this file: {missing}"
    assert not stale, f"cases for alerts the rules no longer have: {stale}"


def test_promtool_fires_every_alert_and_keeps_it_quiet(rendered: Path, example_plan: Plan) -> None:
    promtool = need_tool("promtool", PROMTOOL_HINT)
    folder = gateway(rendered, example_plan) / "prometheus"
    rules = alert_rules(rendered, example_plan)
    assert set(rules) == set(cases(example_plan))
    path = folder / "rules.test.yml"
    path.write_text(yaml.safe_dump(unit_tests(rules, example_plan), sort_keys=False, width=1000, allow_unicode=True))
    result = run([promtool, "test", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


# -- Alertmanager --------------------------------------------------------------------


def test_amtool_check_config(rendered: Path, example_plan: Plan) -> None:
    amtool = need_tool("amtool", AMTOOL_HINT)
    path = gateway(rendered, example_plan) / "alertmanager" / "alertmanager.yml"
    result = run([amtool, "check-config", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_alertmanager_routes_follow_the_spec(rendered: Path, example_plan: Plan) -> None:
    obs = example_plan.fleet.observability
    doc = load(gateway(rendered, example_plan) / "alertmanager" / "alertmanager.yml")
    names = [r["name"] for r in doc["receivers"]]
    if not obs.receivers:
        assert names == ["null"] and doc["route"]["receiver"] == "null"
        return
    assert names == [r.name for r in obs.receivers]
    assert doc["route"]["receiver"] == (obs.default_receiver or obs.receivers[0].name)
    routes = [(r["matchers"], r["receiver"]) for r in doc["route"].get("routes", [])]
    assert routes == [([f'severity="{r.severity}"'], r.receiver) for r in obs.routes]
    for spec, rendered_receiver in zip(obs.receivers, doc["receivers"], strict=True):
        if spec.email:
            assert rendered_receiver["email_configs"][0]["to"] == spec.email
            assert {"smtp_smarthost", "smtp_from"} <= set(doc["global"])
        else:
            assert rendered_receiver["webhook_configs"][0]["url"] == spec.webhook_url


# -- Grafana -------------------------------------------------------------------------

GRAFANA_VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def grafana_expr(expr: str) -> str:
    """An expression as Grafana sends it: its variables replaced by what they become."""
    return _VARIABLE.sub(lambda m: GRAFANA_VARIABLES.get(m.group(1), ".*"), expr)


def dashboards(rendered: Path, plan: Plan) -> list[dict[str, Any]]:
    paths = sorted((gateway(rendered, plan) / "grafana" / "dashboards").glob("*.json"))
    assert len(paths) >= 4
    return [json.loads(p.read_text()) for p in paths]


def test_grafana_provisioning(rendered: Path, example_plan: Plan) -> None:
    base = gateway(rendered, example_plan) / "grafana" / "provisioning"
    (provider,) = load(base / "dashboards" / "fleet.yaml")["providers"]
    assert load(base / "dashboards" / "fleet.yaml")["apiVersion"] == 1
    assert provider["type"] == "file" and provider["options"]["path"] == "/etc/grafana/dashboards"
    (source,) = load(base / "datasources" / "prometheus.yaml")["datasources"]
    prometheus = f"http://127.0.0.1:{example_plan.fleet.gateway.ports.prometheus}"
    assert source["type"] == "prometheus" and source["url"] == prometheus
    (grafana,) = [c for c in host_containers(example_plan, example_plan.fleet.gateway.host) if c.name == "grafana"]
    mounts = {v.target: v.source for v in grafana.volumes}
    assert mounts["/etc/grafana/dashboards"] == "/etc/fleet/grafana/dashboards"
    for board in dashboards(rendered, example_plan):
        for panel in (p for p in board["panels"] if p["type"] != "row"):
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
            assert all(t["datasource"]["uid"] == source["uid"] for t in panel["targets"]), panel["title"]


def test_grafana_dashboards_query_contract_metrics(rendered: Path, example_plan: Plan, tmp_path: Path) -> None:
    promtool = need_tool("promtool", PROMTOOL_HINT)
    allowed = CONTRACT | recorded(rendered, example_plan)
    titles = set()
    exprs: list[str] = []
    for board in dashboards(rendered, example_plan):
        assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
        titles.add(board["uid"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{board['uid']}: panel ids repeat"
        for variable in board["templating"]["list"]:
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
            assert m, f"{board['uid']}: variable {variable['name']} is not label_values(selector, label)"
            exprs.append(m.group(1))
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            where = f"{board['uid']}: panel {panel['title']!r}"
            assert panel["targets"], f"{where}: no queries"
            assert panel["gridPos"]["x"] >= 0 and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, where
            for target in panel["targets"]:
                exprs.append(grafana_expr(target["expr"]))
    assert titles >= {"fleet-overview", "fleet-gpus", "fleet-models", "fleet-usage"}
    for expr in exprs:
        unknown = metric_names(expr) - allowed
        assert not unknown, f"{expr}: {unknown} not in the metric contract or the recording rules"
    promtool_parses(promtool, exprs, tmp_path)


# -- the containers that run it ---------------------------------------------------


def test_monitoring_containers_on_the_gateway(example_plan: Plan) -> None:
    plan = example_plan
    by_name: dict[str, Container] = {c.name: c for c in host_containers(plan, plan.fleet.gateway.host)}
    images = plan.fleet.images
    expected = {
        "prometheus": (images.prometheus, f"127.0.0.1:{plan.fleet.gateway.ports.prometheus}"),
        "alertmanager": (images.alertmanager, f"127.0.0.1:{plan.fleet.gateway.ports.alertmanager}"),
    }
    for name, (image, listen) in expected.items():
        c = by_name[name]
        assert c.image == image and c.host_network and not c.ports
        assert f"--web.listen-address={listen}" in c.args
        assert all(v.read_only for v in c.volumes if v.is_bind)
    assert "--cluster.listen-address=" in by_name["alertmanager"].args  # no gossip on every interface
    grafana = by_name["grafana"]
    assert grafana.image == images.grafana and grafana.host_network
    assert grafana.env["GF_SERVER_HTTP_ADDR"] == "127.0.0.1" and grafana.env["GF_SERVER_HTTP_PORT"] == str(
        plan.fleet.gateway.ports.grafana
    )
    assert all(v.read_only for v in grafana.volumes if v.is_bind)


def test_an_agent_on_every_gpu_host(example_plan: Plan) -> None:
    for host in example_plan.fleet.hosts or []:
        agents = [c for c in host_containers(example_plan, host.name) if c.name == "agent"]
        if not host.gpus:
            assert agents == []
            continue
        (agent,) = agents
        assert agent.image == example_plan.fleet.images.agent
        assert agent.devices == [f"nvidia.com/gpu={g.uuid}" for g in host.gpus]
        args = agent.args
        assert args[0] == "fleet-agent"
        for flag, value in (
            ("--host", str(host.address)),
            ("--port", str(host.agent_port)),
            ("--state-dir", "/var/lib/fleet-agent"),
        ):
            assert args[args.index(flag) + 1] == value
        (socket,) = [v for v in agent.volumes if v.target == ENGINE_SOCKET]
        assert socket.read_only
        assert agent.health is not None and "/healthz" in " ".join(agent.health.cmd)
        assert agent.host_network and not agent.ports
