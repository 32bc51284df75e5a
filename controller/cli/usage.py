"""`controller usage`: tokens per user, model and key, from the ledger (streams included)."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Table

from controller.cli.common import JsonOpt, StateOpt, console, emit_json, state_dir
from controller.cli.keys import parse_duration
from controller.errors import ControllerError
from controller.services.ledger import GROUPS, Ledger


def usage(
    since: Annotated[str, typer.Option("--since", help="How far back, e.g. 1h, 24h, 7d.")] = "24h",
    by: Annotated[str, typer.Option("--by", help="Group by user, model, key, day (comma-separated).")] = "user,model",
    state_opt: StateOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show usage. Reads Envoy's latest usage lines first, so it is current even if the gatekeeper is down."""
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
    for col in [*groups, "requests", "prompt tokens", "completion tokens", "total"]:
        table.add_column(
            col, justify="right" if col in ("requests", "prompt tokens", "completion tokens", "total") else "left"
        )
    for row in rows:
        table.add_row(
            *(str(row[g] or "-") for g in groups),
            str(row["requests"]),
            str(row["prompt_tokens"]),
            str(row["completion_tokens"]),
            str(row["total_tokens"]),
        )
    console().print(table)
