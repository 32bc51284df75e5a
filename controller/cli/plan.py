"""`controller plan FILE`: where every replica goes, and its VRAM estimate by term."""

from __future__ import annotations

from rich.table import Table

from controller.cli.common import JsonOpt, SpecArg, console, emit_json, load_plan
from controller.plan.models import Plan


def plan(spec: SpecArg, as_json: JsonOpt = False) -> None:
    """Show the placement: host, GPU, worker, VRAM estimate per term, headroom."""
    result = load_plan(spec)
    if as_json:
        emit_json(result.summary())
        return
    out = console()
    out.print(workers_table(result))
    out.print(gpus_table(result))
    for w in result.workers:
        settings = " ".join(f"{k}={v}" for k, v in w.settings.items() if k != "reserved_gib")
        out.print(f"{w.name}: {settings}", markup=False)
        for term, basis in w.estimate.basis.items():
            out.print(f"    {term}: {basis}", markup=False)


def workers_table(plan: Plan) -> Table:
    table = Table(title=f"fleet {plan.fleet.name}: {len(plan.workers)} worker(s)", title_justify="left")
    for col in ("host", "gpu", "worker", "backend", "port"):
        table.add_column(col)
    for col in ("weights GiB", "kv cache GiB", "overhead GiB", "total GiB", "booked GiB"):
        table.add_column(col, justify="right")
    for w in plan.workers:
        gpu = ",".join(f"gpu{g.index}" for g in w.gpus) or "cpu"
        e = w.estimate
        table.add_row(
            w.host,
            gpu,
            w.name,
            w.backend,
            str(w.port),
            f"{e.weights_gib:.2f}",
            f"{e.kv_cache_gib:.2f}",
            f"{e.overhead_gib:.2f}",
            f"{e.total_gib:.2f}",
            f"{w.footprint_gib:.2f}" if w.gpus else "-",
        )
    return table


def gpus_table(plan: Plan) -> Table:
    table = Table(title="GPUs", title_justify="left")
    for col in ("host", "gpu", "uuid"):
        table.add_column(col)
    for col in ("vram GiB", "usable GiB", "booked GiB", "headroom GiB"):
        table.add_column(col, justify="right")
    for use in plan.gpus:
        g = use.gpu
        table.add_row(
            g.host,
            f"gpu{g.index}: {g.name}",
            g.uuid,
            f"{g.vram_gib:.2f}",
            f"{use.usable_gib:.2f}",
            f"{use.used_gib:.2f}",
            f"{use.headroom_gib:.2f}",
        )
    return table
