"""Alertmanager on the gateway host: `<gateway>/alertmanager/alertmanager.yml`.

Built as data from ``fleet.observability``: one receiver per spec receiver
(e-mail or webhook), one route per `routes` entry matching on the alert's
`severity` label, and the root route to `default_receiver`. With no
`default_receiver`, alerts no route matches go to the first receiver, so
that naming someone is enough to be told; with no receivers at all, to a
receiver named `null` that sends nothing, and the file is still valid.

E-mail needs an SMTP relay, which the spec does not describe yet: the
`global` section points at a relay on the gateway host itself
(`localhost:25`, e.g. nullmailer or Postfix) and a sender at the public
name; see monitoring/README.md for changing them.
"""

from __future__ import annotations

from typing import Any

from controller.plan.models import Plan
from controller.render import Files, dump_yaml, renderer
from controller.spec.models import Receiver

HEADER = "# Rendered by `controller render` from the fleet spec; do not edit.\n"
NULL_RECEIVER = "null"
SMTP_RELAY = "localhost:25"
# A model without any healthy replica explains its workers being down and its
# requests failing: page once, for the model.
MODEL_DOWN_EXPLAINS = (
    "FleetWorkerDown",
    "FleetModelQueueGrowing",
    "FleetModelLatencyHigh",
    "FleetModelTimeToFirstTokenHigh",
    "FleetModelErrorRateHigh",
)


@renderer("alertmanager")
def render(plan: Plan) -> Files:
    path = f"{plan.fleet.gateway.host}/alertmanager/alertmanager.yml"
    text = dump_yaml(config(plan))
    return {path: HEADER + text}


def config(plan: Plan) -> dict[str, Any]:
    obs = plan.fleet.observability
    receivers = [receiver(r) for r in obs.receivers] or [{"name": NULL_RECEIVER}]
    default = obs.default_receiver or receivers[0]["name"]
    doc: dict[str, Any] = {"global": _global(plan)}
    doc["route"] = {
        "receiver": default,
        "group_by": ["alertname", "model", "host"],
        "group_wait": "30s",
        "group_interval": "5m",
        "repeat_interval": "4h",
    }
    if obs.routes:
        doc["route"]["routes"] = [
            {"receiver": r.receiver, "matchers": [f'severity="{r.severity}"']} for r in obs.routes
        ]
    doc["inhibit_rules"] = [
        {
            "source_matchers": ['alertname="FleetModelUnavailable"'],
            "target_matchers": [f'alertname=~"{"|".join(MODEL_DOWN_EXPLAINS)}"'],
            "equal": ["model"],
        }
    ]
    doc["receivers"] = receivers
    return doc


def _global(plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {"resolve_timeout": "5m"}
    if any(r.email for r in plan.fleet.observability.receivers):
        out["smtp_smarthost"] = SMTP_RELAY
        out["smtp_from"] = f"fleet-alerts@{plan.fleet.gateway.public_name}"
        out["smtp_require_tls"] = False  # a relay on this host; it carries the mail on with TLS
    return out


def receiver(r: Receiver) -> dict[str, Any]:
    if r.email is not None:
        return {"name": r.name, "email_configs": [{"to": r.email, "send_resolved": True}]}
    return {"name": r.name, "webhook_configs": [{"url": r.webhook_url, "send_resolved": True}]}
