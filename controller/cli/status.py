"""`controller status`: the stack's base URL, CA, and each process's state, PID, GPU, restarts and uptime."""

from __future__ import annotations

import time
from typing import Any

from rich import box
from rich.table import Table

from controller.cli.common import JsonOpt, StateOpt, console, emit_json, state_dir
from controller.local import stack


def status(state_opt: StateOpt = None, as_json: JsonOpt = False) -> None:
    """Show the local stack. Exit 1 when it is not running.

    The table's state is the supervisor's, from its health checks (healthy, starting, unhealthy, backoff,
    stopped); with no supervisor running, a process is stopped, or orphaned when it still runs (the next
    `controller up` adopts it). --json has every field, health, kind and ports included.
    """
    import typer

    info = stack.status(state_dir(state_opt))
    if as_json:
        emit_json(info)
    else:
        out = console()
        running = f"running (supervisor pid {info['supervisor_pid']})" if info["running"] else "not running"
        # Paths whole on their lines, however narrow the terminal: they are there to be copied.
        out.print(f"stack {info['state_dir']}: {running}", soft_wrap=True)
        if info["base_url"]:
            out.print(
                f"base URL: {info['base_url']}\nCA cert:  {info['ca_cert']}\nspec:     {info['spec']}", soft_wrap=True
            )
        out.print(process_table(info["processes"], time.time()))
    if not info["running"]:
        raise typer.Exit(1)


def process_table(procs: dict[str, dict[str, Any]], now: float) -> Table:
    """One row per process. Names are never cut (they are what `logs`, `restart` and `stop` take); on a narrow
    terminal the other columns wrap instead (a GPU UUID list folds). No borders, one space between columns: the
    demo's table fits 80 columns. Health, latency, kind and ports are in --json."""
    rows = [
        [
            name,
            row["state"],
            str(row["pid"] or "-"),
            ",".join(row.get("gpus") or []) or ("cpu" if row["kind"] == "worker" else "-"),
            row.get("model") or "-",
            str(row["restarts"]),
            uptime(now - row["up_since"]) if row.get("up_since") else "-",
        ]
        for name, row in procs.items()
    ]
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0), pad_edge=False)
    table.add_column("process", no_wrap=True, min_width=max((len(r[0]) for r in rows), default=7))
    for col in ("state", "pid", "gpu", "model", "restarts", "up"):
        table.add_column(col, overflow="fold", justify="right" if col in ("pid", "restarts", "up") else "left")
    for r in rows:
        table.add_row(*r)
    return table


def uptime(seconds: float) -> str:
    """45s, 12m05s, 3h12m, 2d03h: at most six characters."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
