"""`controller status`: the local stack (base URL, CA, each process's state, PID, GPU, restarts, uptime), or with a
SPEC the deployed fleet's (controller/deploy/status.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import typer
from rich import box
from rich.table import Table

from controller.cli.common import JsonOpt, StateOpt, console, emit_json, state_dir
from controller.errors import ControllerError
from controller.local import stack
from controller.plan import make_plan
from controller.spec import load_spec
from controller.warnings import Facts, Warning, evaluate

if TYPE_CHECKING:
    from controller.deploy.status import Report


AGENT_TIMEOUT_S = 3.0  # the agent's /status checks every worker's health first (about a second)


class StatusUsageError(ControllerError):
    exit_code = 2  # as click's usage errors


def status(
    spec: Annotated[
        Path | None,
        typer.Argument(help="A deployed fleet's spec: show that fleet, from its hosts.", show_default=False),
    ] = None,
    fleet: Annotated[
        bool, typer.Option("--fleet", help="The deployed fleet of SPEC (the default whenever SPEC is given).")
    ] = False,
    ssh_config: Annotated[
        Path | None,
        typer.Option("--ssh-config", help="With SPEC: an ssh_config file for reaching the hosts.", show_default=False),
    ] = None,
    ssh_key: Annotated[
        Path | None, typer.Option("--ssh-key", help="With SPEC: the SSH private key for the hosts.", show_default=False)
    ] = None,
    state_opt: StateOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the local stack; with SPEC, the deployed fleet. Exit 1 when it is not running, or not all well.

    Local stack (no SPEC): the table's state is the supervisor's, from its health checks (healthy, starting,
    unhealthy, backoff, stopped); with no supervisor running, a process is stopped, or orphaned when it still
    runs (the next `controller up` adopts it). --json has every field, health, kind and ports included.

    Deployed fleet (SPEC, or SPEC --fleet): one read-only probe on every host at once over SSH: per host SSH,
    the deployed spec version against SPEC's, containers running; the mesh between every pair of hosts; per
    worker its health, latency and GPU pinning (from the host's agent). Each problem is a line; exit 1 if any.
    """
    if spec is not None:
        fleet_status(spec, ssh_config, ssh_key, state_opt, as_json)
        return
    if fleet or ssh_config is not None or ssh_key is not None:
        raise StatusUsageError(
            "--fleet, --ssh-config and --ssh-key need the fleet's SPEC: controller status SPEC --fleet"
        )
    info = stack.status(state_dir(state_opt))
    found = stack_warnings(info) if info["running"] else []
    info["warnings"] = [w.as_dict() for w in found]
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
        for w in found:
            out.print(f"{w.severity}: {w.code}: {w.message} (runbook: {w.runbook})", soft_wrap=True, markup=False)
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


def stack_warnings(info: dict[str, Any]) -> list[Warning]:
    """The warnings engine (controller/warnings.py) over what the local stack knows: its agent's /status and each
    worker's state as the supervisor's health checks see it (a worker that is starting is not down yet)."""
    try:
        plan = make_plan(load_spec(Path(info["spec"])))
    except (ControllerError, OSError, KeyError, TypeError):
        return []  # no spec to say what should run: the table says what does
    procs: dict[str, dict[str, Any]] = info["processes"]
    up = {
        name: row["state"] == "healthy"
        for name, row in procs.items()
        if row.get("kind") == "worker" and row.get("state") in ("healthy", "unhealthy", "backoff", "stopped")
    }
    doc = agent_status(procs)
    agents = {str(doc.get("host")): doc} if doc is not None else {}
    return evaluate(plan, Facts(agents=agents, workers_up=up))


def agent_status(procs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The local stack's agent's /status; None when the agent is not healthy or does not answer within
    AGENT_TIMEOUT_S."""
    agent = next((r for r in procs.values() if r.get("kind") == "agent" and r.get("state") == "healthy"), None)
    if agent is None or not agent.get("ports"):
        return None
    try:
        answer = httpx.get(f"http://127.0.0.1:{agent['ports'][0]}/status", timeout=AGENT_TIMEOUT_S, trust_env=False)
        doc = answer.json() if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


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


def fleet_status(spec: Path, ssh_config: Path | None, ssh_key: Path | None, state: Path | None, as_json: bool) -> None:
    from controller.cli.common import load
    from controller.deploy.ansible import Connection
    from controller.deploy.status import fleet_status as run_status
    from controller.plan import make_plan

    loaded = load(spec)
    plan = make_plan(loaded)
    rep = run_status(loaded, plan, state_dir(state).root, Connection(ssh_config, ssh_key))
    if as_json:
        emit_json(rep.as_dict())
    else:
        print_report(rep)
    if rep.exit_code:
        raise typer.Exit(rep.exit_code)


def print_report(rep: Report) -> None:
    out = console()
    out.print(
        f"fleet {rep.fleet}: {len(rep.hosts)} host(s), spec {rep.spec} version {rep.version[:12]} "
        f"(sha256 of the resolved spec); probed in {rep.seconds:.1f} s",
        soft_wrap=True,
    )
    for table in report_tables(rep):
        out.print()
        out.print(table)
    out.print()
    if rep.mesh:
        out.print(f"mesh checked by: {rep.mesh_method}", soft_wrap=True)
    for note in rep.notes:
        out.print(f"note: {note}", soft_wrap=True)
    for w in rep.warnings:  # the warnings engine over the agents' answers (controller/warnings.py)
        out.print(
            f"{w['severity']}: {w['code']}: {w['message']} (runbook: {w['runbook']})", soft_wrap=True, markup=False
        )
    for problem in rep.problems:
        out.print(f"problem: {problem}", soft_wrap=True)
    out.print(f"{len(rep.problems)} problem(s)" if rep.problems else "all ok")


def _table(*columns: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0), pad_edge=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


def report_tables(rep: Report) -> list[Table]:
    """Hosts, the mesh matrix (rows: from, columns: to), workers."""
    hosts = _table("host", "ssh", "deployed", "containers", "agent")
    for h in rep.hosts:
        d = h["deployed"]
        deployed = "-" if h["ssh"] != "ok" else "not deployed"
        if d:
            when = f" {d.get('deployed_at') or ''}".rstrip()
            deployed = ("current" if d["current"] else f"OLD {str(d['spec_sha256'] or '?')[:12]}") + when
        c = h["containers"]
        containers = f"{c['running']}/{c['total']} running" if c else "-"
        a = h["agent"]
        agent = "-" if a is None else ("ok" + ("" if a["nvml"]["up"] else ", NVML down") if a["ok"] else "no answer")
        hosts.add_row(h["name"], h["ssh"], deployed, containers, agent)
    tables = [hosts]
    if rep.mesh:
        names = [h["name"] for h in rep.hosts]
        cells = {(p["from"], p["to"]): p["verdict"] for p in rep.mesh}
        mesh = _table("mesh from \\ to", *names)
        for src in names:
            mesh.add_row(src, *("-" if src == dst else cells.get((src, dst), "?") for dst in names))
        tables.append(mesh)
    if rep.workers:
        workers = _table("worker", "host", "gpu", "health", "latency", "pinning", "version")
        for w in rep.workers:
            gpus = ",".join(f"{g['index']}:{g['uuid']}" for g in w["gpus"]) or "cpu"
            latency = f"{w['latency_ms']:.0f} ms" if w["latency_ms"] is not None else "-"
            version = "-" if w["current"] is None else ("current" if w["current"] else "OLD")
            workers.add_row(w["worker"], w["host"], gpus, w["health"], latency, w["pinning"], version)
        tables.append(workers)
    return tables
