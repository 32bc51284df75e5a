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
    for line in swap_lines(result):
        out.print(line, markup=False)
    for w in result.workers:
        settings = " ".join(f"{k}={v}" for k, v in w.settings.items() if k != "reserved_gib")
        out.print(f"{w.name}: {settings}", markup=False)
        for term, basis in w.estimate.basis.items():
            out.print(f"    {term}: {basis}", markup=False)


TERMS = ("weights", "kv cache", "compute", "graphs", "draft", "overhead")


def workers_table(plan: Plan) -> Table:
    table = Table(title=f"fleet {plan.fleet.name}: {len(plan.workers)} worker(s)", title_justify="left")
    for col in ("host", "gpu", "worker", "backend", "port"):
        table.add_column(col)
    # Every term of the estimate that some worker has; they add up to the total.
    terms = [t for t in TERMS if any(w.estimate.terms().get(t) for w in plan.workers) or t in ("weights", "kv cache")]
    for col in (*(f"{t} GiB" for t in terms), "total GiB", "booked GiB"):
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
            *(f"{e.terms().get(t, 0.0):.2f}" for t in terms),
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


def swap_lines(plan: Plan) -> list[str]:
    """Per GPU of a swap group: the memory its on-demand models share, and which of them fit at once at most."""
    by_name = {w.name: w for w in plan.workers}
    lines = []
    for use in plan.gpus:
        if use.swap_group is None or use.swap_capacity_gib is None:
            continue
        members = [by_name[n] for n in use.workers if plan.model(by_name[n].model).swap is not None]
        listed = ", ".join(
            f"{w.model} {w.footprint_gib:.2f}"
            + (
                " (always resident)"
                if plan.always_resident(w)
                else f" ({w.asleep_gib:.2f} kept asleep)"
                if w.asleep_gib
                else ""
            )
            for w in members
        )
        at_once = plan.resident_at_most(use)
        lines.append(
            f"{use.gpu.label} swap group {use.swap_group}: {use.swap_capacity_gib:.2f} GiB for {len(members)} "
            f"on-demand model(s) ({listed} GiB); resident at most at once: {len(at_once)} "
            f"({', '.join(by_name[n].model for n in at_once)})"
        )
    return lines
