"""`controller status`: the stack's base URL, CA, and each process's state, PID, GPU and health."""

from __future__ import annotations

import time

from rich.table import Table

from controller.cli.common import JsonOpt, StateOpt, console, emit_json, state_dir
from controller.local import stack


def status(state_opt: StateOpt = None, as_json: JsonOpt = False) -> None:
    """Show the local stack. Exit 1 when it is not running."""
    import typer

    info = stack.status(state_dir(state_opt))
    if as_json:
        emit_json(info)
    else:
        out = console()
        running = f"running (supervisor pid {info['supervisor_pid']})" if info["running"] else "not running"
        out.print(f"stack {info['state_dir']}: {running}")
        if info["base_url"]:
            out.print(f"base URL: {info['base_url']}\nCA cert:  {info['ca_cert']}\nspec:     {info['spec']}")
        table = Table()
        for col in ("process", "kind", "state", "health", "pid", "gpu", "model", "restarts", "up", "latency ms"):
            table.add_column(col)
        now = time.time()
        for name, row in info["processes"].items():
            up = f"{now - row['up_since']:.0f}s" if row.get("up_since") else "-"
            gpus = ",".join(row.get("gpus") or []) or ("cpu" if row["kind"] == "worker" else "-")
            table.add_row(
                name,
                row["kind"],
                row["state"],
                row["health"],
                str(row["pid"] or "-"),
                gpus,
                row.get("model") or "-",
                str(row["restarts"]),
                up,
                str(row.get("latency_ms") or "-"),
            )
        out.print(table)
    if not info["running"]:
        raise typer.Exit(1)
