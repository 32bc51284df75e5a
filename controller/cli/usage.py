"""`controller usage`: tokens per user, model, key and app, from the ledger (streams included)."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Table

from controller.cli.common import JsonOpt, StateOpt, console, emit_json, state_dir
from controller.cli.keys import parse_duration
from controller.errors import ControllerError
from controller.gateway.ledger import GROUPS, Ledger


def usage(
    since: Annotated[str, typer.Option("--since", help="How far back, e.g. 1h, 24h, 7d.")] = "24h",
    by: Annotated[
        str, typer.Option("--by", help="Group by user, model, key, app, day (comma-separated).")
    ] = "user,model",
    state_opt: StateOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show usage. Reads Envoy's latest usage lines first, so it is current even if the gatekeeper is down.

    Requests whose backend never sent its numbers (the client left mid-stream, the backend was killed)
    are counted from what the gateway saw and shown as estimated.
    """
    state = state_dir(state_opt)
    groups = [g.strip() for g in by.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ControllerError(f"--by {', '.join(unknown)}: choose from {', '.join(GROUPS)}")
    ledger = Ledger(state.gatekeeper / "usage.db")
    try:
        ledger.ingest(state.usage_log)
        rows = ledger.summary(time.time() - parse_duration(since), groups)
    finally:
        ledger.close()
    if as_json:
        emit_json(rows)
        return
    table = Table(title=f"usage, last {since}", title_justify="left")
    numbers = ("requests", "prompt tokens", "completion tokens", "total", "estimated")
    for col in [*groups, *numbers]:
        table.add_column(col, justify="right" if col in numbers else "left")
    for row in rows:
        table.add_row(
            *(str(row[g] or "-") for g in groups),
            str(row["requests"]),
            str(row["prompt_tokens"]),
            str(row["completion_tokens"]),
            str(row["total_tokens"]),
            _estimated(row),
        )
    console().print(table)
    if any(row["estimated_requests"] for row in rows):
        console().print(
            "estimated: requests whose backend numbers never came (the client left, the backend stopped, or it "
            "sends none), counted from what the gateway saw, never less than was generated; see README, Usage"
        )


def _estimated(row: dict[str, int]) -> str:
    if not row["estimated_requests"]:
        return "-"
    return f"{row['estimated_tokens']} tokens in {row['estimated_requests']}"
