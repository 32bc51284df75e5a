"""`controller validate FILE`: parse and cross-check the spec, and check that it can be placed."""

from __future__ import annotations

from controller.cli.common import JsonOpt, SpecArg, console, emit_json, load_plan


def validate(spec: SpecArg, as_json: JsonOpt = False) -> None:
    """Check a fleet file: schema, cross-references and placement. Exit 2 on any problem."""
    plan = load_plan(spec)
    hosts = plan.fleet.hosts or []
    if as_json:
        emit_json(
            {
                "ok": True,
                "fleet": plan.fleet.name,
                "hosts": len(hosts),
                "models": len(plan.fleet.models),
                "workers": len(plan.workers),
            }
        )
        return
    console().print(
        f"{spec}: ok — fleet {plan.fleet.name}: {len(hosts)} host(s), {len(plan.fleet.models)} model(s), "
        f"{len(plan.workers)} worker(s)"
    )
