"""Prometheus rules for the gateway: recording rules and the on-call alerts.

Built as data. Three groups, evaluated in this order by the tests:

- ``fleet-inventory``: one constant series per model and per worker, from
  the plan (``vector(1)`` with labels), so that Envoy's cluster names
  (``model_<slug>``, ``worker_<name>``) join to the spec's model, worker and
  host names in PromQL instead of in every query;
- ``fleet-recording``: per-model and per-GPU figures that the alerts and the
  Grafana dashboards share (queue depth, latency and error ratio, tokens);
- ``fleet-alerts``: every alert has a ``severity`` label (``critical``,
  ``warning`` or ``info``, the severities Alertmanager routes on) and the
  annotations ``summary``, ``description`` and ``runbook``, a link to its
  section of the rendered ``RUNBOOK.md``.

Every alert aggregates to a fixed label set (``by (...)``) so that its labels
say what is wrong and nothing about scrape targets. Annotations use only
``{{ $labels.* }}``; thresholds from ``fleet.observability.thresholds`` are
written in as numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from controller.plan.models import Plan
from controller.plan.vram import MISS_WARN_RATIO
from controller.render.containers import CONFIG_DIR
from controller.render.envoy import model_cluster, worker_cluster

RUNBOOK = f"{CONFIG_DIR}/prometheus/RUNBOOK.md"
RATE_WINDOW = "5m"
# Joins an Envoy series to the spec's names through the inventory series.
TO_MODEL = "* on (envoy_cluster_name) group_left (model) fleet:model_cluster_info"
TO_WORKER = "* on (envoy_cluster_name) group_left (worker, model, host, backend) fleet:worker_cluster_info"
GPU = "host, index, uuid"
Severity = Literal["critical", "warning", "info"]


@dataclass(frozen=True)
class Alert:
    name: str
    severity: Severity
    expr: str
    summary: str
    description: str
    for_: str | None = None

    def rule(self) -> dict[str, Any]:
        rule: dict[str, Any] = {"alert": self.name, "expr": self.expr}
        if self.for_:
            rule["for"] = self.for_
        rule["labels"] = {"severity": self.severity}
        rule["annotations"] = {
            "summary": self.summary,
            "description": self.description,
            "runbook": f"{RUNBOOK}#{self.name.lower()}",
        }
        return rule


def rules(plan: Plan) -> dict[str, Any]:
    return {
        "groups": [
            {"name": "fleet-inventory", "rules": inventory(plan)},
            {"name": "fleet-recording", "rules": recording()},
            {"name": "fleet-alerts", "rules": [a.rule() for a in alerts(plan)]},
        ]
    }


def inventory(plan: Plan) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {
            "record": "fleet:model_cluster_info",
            "expr": "vector(1)",
            "labels": {"envoy_cluster_name": model_cluster(m.name), "model": m.name},
        }
        for m in plan.fleet.models
    ]
    out += [
        {
            "record": "fleet:worker_cluster_info",
            "expr": "vector(1)",
            "labels": {
                "envoy_cluster_name": worker_cluster(w.name),
                "worker": w.name,
                "model": w.model,
                "host": w.host,
                "backend": w.backend,
            },
        }
        for w in plan.workers
    ]
    # On-demand workers (their model has `swap`): unloaded on purpose, they fail health checks like a dead one.
    out += [
        {"record": "fleet:worker_on_demand_info", "expr": "vector(1)", "labels": {"worker": w.name, "model": w.model}}
        for w in plan.on_demand()
    ]
    # The hosts the spec gives GPUs: there NVML must answer (a CPU-only host's agent has no NVML to read).
    out += [
        {"record": "fleet:host_gpu_info", "expr": "vector(1)", "labels": {"host": h.name}}
        for h in plan.fleet.hosts or []
        if h.gpus
    ]
    return out


def _record(name: str, expr: str, **labels: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"record": name, "expr": expr}
    if labels:
        rule["labels"] = labels
    return rule


def _per_model(metric: str, matchers: str = "", fn: str = "rate") -> str:
    """A per-model sum of an Envoy series over the model clusters; ``fn`` over the rate window, or none."""
    series = f'{metric}{{job="envoy", envoy_cluster_name=~"model_.+"{matchers}}}'
    inner = f"{fn}({series}[{RATE_WINDOW}])" if fn else series
    return f"sum by (model) ({inner} {TO_MODEL})"


def recording() -> list[dict[str, Any]]:
    w = RATE_WINDOW
    return [
        _record(
            "fleet:worker_healthy",
            "max by (worker, model, host, backend) "
            f'(envoy_cluster_membership_healthy{{job="envoy", envoy_cluster_name=~"worker_.+"}} {TO_WORKER})',
        ),
        _record("fleet:model_healthy_replicas", _per_model("envoy_cluster_membership_healthy", fn="")),
        _record("fleet:model_replicas", _per_model("envoy_cluster_membership_total", fn="")),
        _record(f"fleet:model_requests:rate{w}", _per_model("envoy_cluster_upstream_rq_total")),
        _record(f"fleet:model_responses:rate{w}", _per_model("envoy_cluster_upstream_rq_xx")),
        # Envoy creates a cluster's 5xx counter at its first 5xx: until then a model that
        # answers has no error series, so its errors are 0 (not absent) and its ratio reads 0.
        _record(
            f"fleet:model_errors:rate{w}",
            _per_model("envoy_cluster_upstream_rq_xx", ', envoy_response_code_class="5"')
            + f" or 0 * fleet:model_responses:rate{w}",
        ),
        _record(f"fleet:model_error_ratio:rate{w}", f"fleet:model_errors:rate{w} / fleet:model_responses:rate{w}"),
        _record(
            f"fleet:model_latency_p95_seconds:{w}",
            # Envoy times upstream requests in milliseconds: from the request to the last response byte.
            "histogram_quantile(0.95, sum by (model, le) "
            f'(rate(envoy_cluster_upstream_rq_time_bucket{{job="envoy", envoy_cluster_name=~"model_.+"}}[{w}]) '
            f"{TO_MODEL})) / 1000",
        ),
        _record(
            f"fleet:model_ttft_p95_seconds:{w}",
            "histogram_quantile(0.95, sum by (model, le) "
            f'(rate(vllm:time_to_first_token_seconds_bucket{{job="workers"}}[{w}])))',
        ),
        _record(
            f"fleet:model_e2e_latency_p95_seconds:{w}",
            "histogram_quantile(0.95, sum by (model, le) "
            f'(rate(vllm:e2e_request_latency_seconds_bucket{{job="workers"}}[{w}])))',
        ),
        # Queue depth: requests running or waiting in the backends, plus those Envoy holds
        # back as pending on the model's cluster. A model may lack either part (Ollama has
        # no metrics; Envoy may be down), so the sum falls back to whichever exists.
        _record(
            "fleet:model_backend_queue",
            'sum by (model) (vllm:num_requests_running{job="workers"}) '
            '+ sum by (model) (vllm:num_requests_waiting{job="workers"})',
            backend="vllm",
        ),
        _record(
            "fleet:model_backend_queue",
            'sum by (model) (llamacpp:requests_processing{job="workers"}) '
            '+ sum by (model) (llamacpp:requests_deferred{job="workers"})',
            backend="llamacpp",
        ),
        _record("fleet:model_gateway_pending", _per_model("envoy_cluster_upstream_rq_pending_active", fn="")),
        _record(
            "fleet:model_queue_depth",
            "(sum by (model) (fleet:model_backend_queue) + on (model) fleet:model_gateway_pending) "
            "or sum by (model) (fleet:model_backend_queue) or fleet:model_gateway_pending",
        ),
        _record(
            f"fleet:model_prompt_tokens:rate{w}",
            f'sum by (model) (rate(vllm:prompt_tokens_total{{job="workers"}}[{w}]))',
            backend="vllm",
        ),
        _record(
            f"fleet:model_prompt_tokens:rate{w}",
            f'sum by (model) (rate(llamacpp:prompt_tokens_total{{job="workers"}}[{w}]))',
            backend="llamacpp",
        ),
        _record(
            f"fleet:model_generated_tokens:rate{w}",
            f'sum by (model) (rate(vllm:generation_tokens_total{{job="workers"}}[{w}]))',
            backend="vllm",
        ),
        _record(
            f"fleet:model_generated_tokens:rate{w}",
            f'sum by (model) (rate(llamacpp:tokens_predicted_total{{job="workers"}}[{w}]))',
            backend="llamacpp",
        ),
        _record(
            "fleet:gpu_memory_used_ratio",
            f'max by ({GPU}, name) (fleet_gpu_memory_used_bytes{{job="agents"}} '
            '/ fleet_gpu_memory_total_bytes{job="agents"})',
        ),
    ]


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def alerts(plan: Plan) -> list[Alert]:
    t = plan.fleet.observability.thresholds
    w = RATE_WINDOW
    gpu = "GPU {{ $labels.index }} ({{ $labels.uuid }}) on {{ $labels.host }}"
    model = "model {{ $labels.model }}"
    return [
        Alert(
            "FleetWorkerDown",
            "warning",
            "(min by (worker, model, host) (fleet:worker_healthy) == 0 "
            'or min by (worker, model, host) (fleet_worker_up{job="agents"}) == 0) '
            "unless on (worker) fleet:worker_on_demand_info",
            "worker {{ $labels.worker }} of {{ $labels.model }} on {{ $labels.host }} is down",
            "Envoy's health checks or the host agent find the worker not answering; its model runs on the "
            "other replicas, if any. (On-demand workers are left out: unloaded, they fail health checks too.)",
            for_="2m",
        ),
        Alert(
            "FleetModelUnavailable",
            "critical",
            "fleet:model_healthy_replicas == 0 unless on (model) fleet:worker_on_demand_info",
            f"{model} has no healthy replica",
            "Every replica fails Envoy's health checks; requests for this model get 503 at once.",
            for_="1m",
        ),
        Alert(
            "FleetGpuThermalThrottling",
            "warning",
            f'max by ({GPU}) (fleet_gpu_throttle_active{{job="agents", reason="thermal"}}) == 1',
            f"{gpu} is throttling its clocks for heat",
            "NVML reports thermal clock throttling: the GPU is slower than it should be.",
            for_="5m",
        ),
        Alert(
            "FleetGpuHardwareSlowdown",
            "warning",
            f'max by ({GPU}) (fleet_gpu_throttle_active{{job="agents", reason="hw_slowdown"}}) == 1',
            f"{gpu} is slowed down by its hardware",
            "NVML reports hardware slowdown or a power brake: the board itself holds the clocks down (power supply, "
            "overheating sensors outside the GPU, a failing fan).",
            for_="5m",
        ),
        Alert(
            "FleetGpuTemperatureHigh",
            "warning",
            f'max by ({GPU}) (fleet_gpu_temperature_celsius{{job="agents"}}) > {_num(t.gpu_temp_c)}',
            f"{gpu} is above {_num(t.gpu_temp_c)} °C",
            f"The GPU has run hotter than the fleet's threshold ({_num(t.gpu_temp_c)} °C) for five minutes.",
            for_="5m",
        ),
        Alert(
            "FleetGpuPowerCapThrottling",
            "info",
            f'max by ({GPU}) (fleet_gpu_throttle_active{{job="agents", reason="power_cap"}}) == 1',
            f"{gpu} is held at its power limit",
            "NVML reports power-cap throttling for a quarter of an hour: normal under full load, "
            "a sign of a lowered power limit otherwise.",
            for_="15m",
        ),
        Alert(
            "FleetGpuMemoryNearlyFull",
            "warning",
            f"max by ({GPU}) (fleet:gpu_memory_used_ratio) > {_num(t.vram_used_ratio)}",
            f"{gpu} has more than {_num(t.vram_used_ratio * 100)}% of its memory in use",
            "A new replica or a longer context may fail to load with out-of-memory on this GPU.",
            for_="10m",
        ),
        Alert(
            "FleetWorkerWrongGpu",
            "critical",
            'max by (worker, model, host) (fleet_worker_pinning{job="agents", state="wrong_gpu"}) == 1',
            "worker {{ $labels.worker }} on {{ $labels.host }} runs on a GPU the plan did not give it",
            "The host agent found the worker's processes on another GPU than planned: the VRAM "
            "estimate no longer holds for either GPU.",
            for_="2m",
        ),
        Alert(
            "FleetWorkerMemoryOnManyGpus",
            "critical",
            'count by (worker, host) (fleet_worker_memory_measured_bytes{job="agents"}) '
            '> count by (worker, host) (fleet_worker_memory_estimate_bytes{job="agents"})',
            "worker {{ $labels.worker }} on {{ $labels.host }} holds memory on more GPUs than planned",
            "The worker's processes hold memory on more GPUs than the plan gave it (a spill across GPUs): the "
            "other GPUs' bookings no longer hold.",
            for_="2m",
        ),
        Alert(
            "FleetWorkerMemoryOffEstimate",
            "warning",
            f'max by (worker, host) (abs(fleet_worker_memory_estimate_miss_ratio{{job="agents"}})) '
            f"> {_num(MISS_WARN_RATIO)}",
            "worker {{ $labels.worker }} on {{ $labels.host }} holds GPU memory far from its estimate",
            f"The memory its processes hold (NVML, per process) misses the plan's estimate by more than "
            f"{_num(MISS_WARN_RATIO * 100)}% on one of its GPUs: more starves its neighbours, less wastes the GPU.",
            for_="10m",
        ),
        Alert(
            "FleetWorkerModelMissing",
            "critical",
            'max by (worker, model, host) (fleet_worker_model_missing{job="agents"}) == 1',
            "worker {{ $labels.worker }} on {{ $labels.host }} does not serve {{ $labels.model }}",
            "The worker answers, but its model list lacks a name the spec has it serve: requests routed to it fail.",
            for_="5m",
        ),
        Alert(
            "FleetGpuUnmanagedProcess",
            "warning",
            f'max by ({GPU}) (fleet_gpu_unmanaged_processes{{job="agents"}}) > 0',
            f"{gpu} runs a compute process that no worker owns",
            "Memory taken by a process outside the fleet is missing from the plan's VRAM estimate.",
            for_="10m",
        ),
        Alert(
            "FleetGpuEccErrors",
            "critical",
            f'max by ({GPU}) (increase(fleet_gpu_ecc_errors_total{{job="agents", type="uncorrected"}}[1h])) > 0',
            f"{gpu} had uncorrected ECC memory errors in the last hour",
            "Uncorrected memory errors corrupt results and precede a GPU falling off the bus.",
        ),
        Alert(
            "FleetModelQueueGrowing",
            "warning",
            f"fleet:model_queue_depth > {t.queue_depth}",
            f"{model} has more than {t.queue_depth} requests queued or running",
            "Requests running and waiting in the backends plus those Envoy holds pending have stayed "
            "above the fleet's threshold for five minutes: demand exceeds the replicas.",
            for_="5m",
        ),
        Alert(
            "FleetModelLatencyHigh",
            "warning",
            f"fleet:model_latency_p95_seconds:{w} > {_num(t.latency_p95_s)}",
            f"{model}: 95th percentile request time above {_num(t.latency_p95_s)} s",
            "Measured by Envoy from the request to the last response byte, over five minutes.",
            for_="10m",
        ),
        Alert(
            "FleetModelTimeToFirstTokenHigh",
            "warning",
            f"fleet:model_ttft_p95_seconds:{w} > {_num(t.ttft_p95_s)}",
            f"{model}: 95th percentile time to first token above {_num(t.ttft_p95_s)} s",
            "vLLM's own histogram: prompts wait for a slot or prefill is slow.",
            for_="10m",
        ),
        Alert(
            "FleetModelErrorRateHigh",
            "critical",
            # At least one response a minute, so that one failure of a quiet model does not page.
            f"fleet:model_error_ratio:rate{w} > {_num(t.error_ratio)} "
            f"and on (model) fleet:model_responses:rate{w} * 60 >= 1",
            f"{model}: more than {_num(t.error_ratio * 100)}% of responses are 5xx",
            "Replicas answer with server errors (Envoy's upstream response codes, over five minutes).",
            for_="5m",
        ),
        Alert(
            "FleetGatekeeperDown",
            "critical",
            'up{job="gatekeeper"} == 0',
            "the gatekeeper on {{ $labels.instance }} does not answer",
            "Envoy fails closed: a key it holds no current answer for (and, once the revocation delay has passed, "
            "every key) gets a 503, so clients get errors.",
            for_="1m",
        ),
        Alert(
            "FleetEnvoyDown",
            "critical",
            'up{job="envoy"} == 0',
            "Envoy's admin endpoint on {{ $labels.instance }} does not answer",
            "Envoy routes every request to the workers; without it the API is down.",
            for_="1m",
        ),
        Alert(
            "FleetAgentDown",
            "warning",
            'up{job="agents"} == 0',
            "the host agent on {{ $labels.host }} does not answer",
            "GPU telemetry and pinning checks for this host are blind; the GPU alerts cannot fire.",
            for_="5m",
        ),
        Alert(
            "FleetAgentNvmlDown",
            "warning",
            'max by (host) (fleet_agent_nvml_up{job="agents"}) == 0 and on (host) fleet:host_gpu_info',
            "the host agent on {{ $labels.host }} cannot read NVML",
            "The host has GPUs in the spec, but the driver does not answer the agent: GPU telemetry is missing, "
            "often a driver problem.",
            for_="5m",
        ),
        certificate_alert(plan),
    ]


def certificate_alert(plan: Plan) -> Alert:
    """The served certificate near expiry; the gatekeeper exports its expiry, read from the front door.

    ACME and operator-provided certificates live for months, so the spec's
    threshold in days applies. Caddy's internal CA issues certificates for
    12 hours and renews them at two thirds of that, so there the alert means
    "renewal is stuck": less than one hour left.
    """
    days = plan.fleet.observability.thresholds.cert_expiry_days
    remaining = "(min without (job, instance) (fleet_tls_cert_expiry_timestamp_seconds) - time())"
    if plan.fleet.gateway.tls.mode == "internal":
        return Alert(
            "FleetTlsCertificateExpiring",
            "warning",
            f"{remaining} < 3600",
            "the TLS certificate from Caddy's internal CA expires within the hour",
            "Caddy renews internal certificates long before this and the gatekeeper publishes them to Envoy; "
            "one of the two is stuck (check the gatekeeper's and Caddy's logs).",
            for_="10m",
        )
    return Alert(
        "FleetTlsCertificateExpiring",
        "warning",
        f"{remaining} / 86400 < {days}",
        f"the TLS certificate expires in less than {days} days",
        "Caddy renews ACME certificates 30 days ahead and the gatekeeper publishes them to Envoy; "
        "a certificate this close to expiry was not renewed or not published.",
        for_="10m",
    )
