"""The console's warnings: the warnings engine (controller/warnings.py) over what the console collected."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from controller.plan.models import Plan
from controller.warnings import Facts, evaluate


def console_facts(doc: dict[str, Any], cert_expiry: float | None = None) -> Facts:
    """The engine's facts from one refresh of the console (controller/console/snapshot.py): each host's agent
    /status (None where it did not answer), each worker's health as its card shows it (up or down: Envoy's view,
    down while a resident worker's process starts again; unknown and idle are not down), the requests in flight and
    waiting per model at the gateway."""
    cards = doc.get("workers") or []
    queues: dict[str, int] = {}
    for card in cards:
        if card.get("in_flight") is not None or card.get("queued") is not None:
            queues[card["model"]] = queues.get(card["model"], 0) + int(card.get("in_flight") or 0)
            queues[card["model"]] += int(card.get("queued") or 0)
    return Facts(
        agents=dict(doc.get("agents") or {}),
        workers_up={c["name"]: c["health"] == "up" for c in cards if c.get("health") in ("up", "down")},
        queues=queues,
        cert_expiry=cert_expiry,
        now=float(doc.get("time") or 0) or Facts().now,
    )


def console_warnings(
    cert_expiry: Callable[[], float | None] = lambda: None,
) -> Callable[[Plan, dict[str, Any]], list[dict[str, Any]]]:
    """The collector's `warnings_of`; ``cert_expiry``: when the served certificate expires (the gatekeeper's)."""

    def warnings_of(plan: Plan, doc: dict[str, Any]) -> list[dict[str, Any]]:
        return [w.as_dict() for w in evaluate(plan, console_facts(doc, cert_expiry()))]

    return warnings_of
