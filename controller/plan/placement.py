"""Placement: assign every replica to GPUs of one host, deterministically.

Best-fit decreasing: the replicas needing the most memory per GPU go first;
each goes to the candidate that leaves the least room, after preferring
hosts, then GPUs, that hold no replica of the same model yet (so one lost
host or GPU does not take a model down). Ties break on the spec's host
order and GPU index. A replica spans GPUs only when `gpus_per_replica` asks
for tensor parallelism, and then only GPUs of one host.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from controller import backends
from controller.errors import PlanError, Problem
from controller.plan.models import Estimate, GpuRef, GpuUse
from controller.plan.vram import estimate, fit_hints, gib_pair
from controller.spec.models import Fleet, Host, Model, Pin
from controller.spec.refs import gpu_index
from controller.spec.swap import group_gpus


@dataclass
class _Gpu:
    ref: GpuRef
    usable: float
    used: float = 0.0
    workers: list[str] = field(default_factory=list)
    models: set[str] = field(default_factory=set)

    @property
    def free(self) -> float:
        return round(self.usable - self.used, 3)


_Row = tuple[float, int, int, tuple[str, int]]  # (free GiB, host order, GPU index, key)


class _ByFree:
    """The GPUs a replica without pins may take (those of no swap group), per GPU size, sorted by free memory.

    A single-GPU replica's best fit among hosts without its model yet (the ranking `_best` starts with) is then a
    bisect and a short walk, instead of a footprint and a rank for every GPU of the fleet: placement grew with
    replicas × GPUs (issue 17). Kept in step with every booking by `take`.
    """

    def __init__(self, gpus: dict[tuple[str, int], _Gpu], grouped: dict[tuple[str, int], str], order: dict[str, int]):
        self.gpus = gpus
        self.order = order
        self.rows: dict[float, list[_Row]] = {}  # GPU size → its GPUs' rows, ascending
        for key, g in gpus.items():
            if key not in grouped:
                self.rows.setdefault(g.ref.vram_gib, []).append(self._row(key))
        for rows in self.rows.values():
            rows.sort()

    def _row(self, key: tuple[str, int]) -> _Row:
        return (self.gpus[key].free, self.order[key[0]], key[1], key)

    def take(self, key: tuple[str, int], gib: float) -> None:
        """Book ``gib`` on one GPU, and move its row."""
        g = self.gpus[key]
        rows = self.rows.get(g.ref.vram_gib, [])
        row = self._row(key)
        at = bisect.bisect_left(rows, row)
        listed = at < len(rows) and rows[at] == row  # not where a pin put it on a swap group's GPU
        if listed:
            del rows[at]
        g.used = round(g.used + gib, 3)
        if listed:
            bisect.insort(rows, self._row(key))

    def best(
        self, model: Model, host_models: dict[str, set[str]], footprint: Callable[[list[GpuRef]], float]
    ) -> list[tuple[str, int]] | None:
        """The GPU `_best`'s ranking puts first when some host without a replica of ``model`` has one with room:
        the least room left (rounded as `_best` rounds it), then host order, then index. None where no such GPU
        has room (`_best` ranks every candidate then)."""
        found: tuple[bool, bool, float, int, list[tuple[str, int]]] | None = None
        for rows in self.rows.values():
            if not rows:
                continue
            need = footprint([self.gpus[rows[0][3]].ref])
            least: float | None = None
            at = bisect.bisect_left(rows, (need,))
            while at < len(rows):
                free, order, _, key = rows[at]
                left = round(free - need, 3)
                if least is not None and left > least:
                    break  # rows ascend by free, so by room left: nothing further ranks first
                if model.name in host_models[key[0]]:
                    at += 1
                    continue
                least = left
                rank = (False, False, left, order, [key])
                if found is None or rank < found:
                    found = rank
                # The rest with this much free come later in host order: the next that may rank first has more.
                at = bisect.bisect_left(rows, (free, math.inf), at)
        return None if found is None else found[4]


@dataclass(frozen=True)
class Placed:
    model: Model
    host: str
    gpus: list[GpuRef]
    estimate: Estimate
    settings: dict[str, object]
    slot: int  # 1-based count of this model's replicas on the same host+GPUs (CPU: on the host)


ProblemAt = Callable[[tuple[str | int, ...], str], Problem]


def place(fleet: Fleet, problem: ProblemAt) -> tuple[list[Placed], list[GpuUse]]:
    hosts = fleet.hosts or []
    host_order = {h.name: i for i, h in enumerate(hosts)}
    gpus = {
        (h.name, i): _Gpu(
            GpuRef(host=h.name, index=i, uuid=g.uuid, name=g.name, vram_gib=g.vram_gib),
            usable=round(g.vram_gib - h.reserve_vram_gib, 3),
        )
        for h in hosts
        for i, g in enumerate(h.gpus)
    }
    cpu_free = {h.name: h.cpu_workers for h in hosts}
    for group in fleet.swap_groups:  # a group of CPU models holds its slots, whichever of its models run in them
        if group.cpu_slots is not None:
            cpu_free[group.host] -= group.cpu_slots
    cpu_models: dict[str, set[str]] = {h.name: set() for h in hosts}
    placed: list[Placed] = []
    problems: list[Problem] = []
    index_of = {m.name: i for i, m in enumerate(fleet.models)}
    host_models: dict[str, set[str]] = {h.name: set() for h in hosts}  # the models with a replica on each host
    slots: dict[tuple[str, str, tuple[str, ...]], int] = {}  # (model, host, GPU UUIDs) → replicas placed there

    grouped = _group_gpus(fleet)
    by_free = _ByFree(gpus, grouped, host_order)
    requests = [(m, r, estimate(m)) for m in fleet.models if m.swap is None for r in range(m.replicas)]
    requests.sort(key=lambda x: (x[0].device == "cpu", -x[2].total_gib, -x[0].gpus_per_replica, x[0].name, x[1]))
    for model, replica, est in requests:
        mi = index_of[model.name]
        if model.device == "cpu":
            host = _place_cpu(model, hosts, cpu_free, cpu_models)
            if host is None:
                problems.append(_cpu_problem(problem, mi, model, hosts, cpu_free))
                continue
            slot = slots[(model.name, host, ())] = slots.get((model.name, host, ()), 0) + 1
            settings = backends.get(model.backend).settings(model, est, [])
            placed.append(Placed(model, host, [], est, settings, slot))
            continue
        choice = _best(model, est, hosts, gpus, host_order, grouped, host_models, by_free)
        if isinstance(choice, str):
            problems.append(problem(("models", mi), f"model {model.name} replica {replica + 1}: {choice}"))
            continue
        refs = [gpus[k].ref for k in choice]
        settings = backends.get(model.backend).settings(model, est, refs)
        footprint = float(settings.get("reserved_gib", est.total_gib))
        where = (model.name, "", tuple(g.uuid for g in refs))  # GPU UUIDs are unique fleet-wide
        slot = slots[where] = slots.get(where, 0) + 1
        for key in choice:
            by_free.take(key, footprint)
            gpus[key].models.add(model.name)
        host_models[refs[0].host].add(model.name)
        placed.append(Placed(model, refs[0].host, refs, est, settings, slot))
    capacity = {key: gpus[key].free for key in grouped}  # what the non-swap workers leave to each group
    for group in fleet.swap_groups:
        members = [m for m in fleet.models if m.swap is not None and m.swap.group == group.name]
        if group.cpu_slots is not None:
            for model in members:
                est = estimate(model)
                placed.append(
                    Placed(model, group.host, [], est, backends.get(model.backend).settings(model, est, []), 1)
                )
            continue
        keys = [key for key, name in grouped.items() if name == group.name]
        for model, est, refs, settings, error in _place_group(members, keys, gpus, capacity):
            if error:
                problems.append(problem(("models", fleet.models.index(model)), f"model {model.name}: {error}"))
                continue
            placed.append(Placed(model, refs[0].host, refs, est, settings, 1))
    if problems:
        raise PlanError(f"{len(problems)} replica(s) do not fit", problems)
    uses = [
        GpuUse(
            gpu=g.ref,
            usable_gib=g.usable,
            used_gib=g.used,
            workers=[],
            swap_group=grouped.get(key),
            swap_capacity_gib=capacity.get(key),
        )
        for key, g in gpus.items()
    ]
    return placed, uses


def _group_gpus(fleet: Fleet) -> dict[tuple[str, int], str]:
    """(host, GPU index) → the swap group that holds it."""
    out: dict[tuple[str, int], str] = {}
    for group in fleet.swap_groups:
        host = fleet.host(group.host)
        for index in group_gpus(host, group):
            out[(host.name, index)] = group.name
    return out


def _place_group(
    members: list[Model],
    keys: list[tuple[str, int]],
    gpus: dict[tuple[str, int], _Gpu],
    capacity: dict[tuple[str, int], float],
) -> list[tuple[Model, Estimate, list[GpuRef], dict[str, object], str]]:
    """Each on-demand model of one swap group onto GPUs of the group.

    The group's GPUs hold what the other workers leave (``capacity``). Models that are always resident are
    placed first and booked; each other model must fit *alone* beside them, since the swap coordinator evicts
    the rest before loading it, and beside the residue every other on-demand vLLM model of its GPU keeps while
    asleep (its process stays up); nor may its own residue leave an earlier one no room. Among the GPUs where it
    fits, the one with the least on-demand memory assigned yet, then the lowest index, so the group's models
    spread over its GPUs.
    """
    out: list[tuple[Model, Estimate, list[GpuRef], dict[str, object], str]] = []
    always: dict[tuple[str, int], float] = dict.fromkeys(keys, 0.0)
    assigned: dict[tuple[str, int], float] = dict.fromkeys(keys, 0.0)
    asleep: dict[tuple[str, int], float] = dict.fromkeys(keys, 0.0)  # residues of the vLLM models placed there
    awake: dict[tuple[str, int], tuple[float, str]] = dict.fromkeys(keys, (0.0, ""))  # the most one adds awake
    ests = {m.name: estimate(m) for m in members}
    order = sorted(
        members, key=lambda m: (m.swap is None or m.swap.resident != "always", -ests[m.name].total_gib, m.name)
    )
    for model in order:
        est = ests[model.name]
        resident = model.swap is not None and model.swap.resident == "always"
        tp = model.gpus_per_replica
        candidates = [keys[i : i + tp] for i in range(0, len(keys) - tp + 1)]
        best: tuple[tuple[float, int], list[tuple[str, int]], float, float, dict[str, object]] | None = None
        lines: list[str] = []
        residue_only = True  # every GPU set where it fits alone is refused only for the residue it keeps asleep
        for cand in candidates:
            refs = [gpus[k].ref for k in cand]
            settings = backends.get(model.backend).settings(model, est, refs)
            need = float(settings.get("reserved_gib", est.total_gib))
            residue = 0.0 if resident else min(need, est.sleep_residue_gib or 0.0)
            why, asleep_only = _group_shortfall(cand, gpus, capacity, always, asleep, awake, need, residue)
            if why is None:
                rank = (max(assigned[k] for k in cand), cand[0][1])
                if best is None or rank < best[0]:
                    best = (rank, cand, need, residue, settings)
            else:
                lines.append(why)
                residue_only = residue_only and asleep_only
        if best is None and residue_only and lines:
            why = "; ".join(lines)
            error = (
                f"fits its swap group alone, but asleep (vLLM sleep mode) it would leave the group's other models "
                f"no room: {why}; set `swap.unload: stop` on it (nothing is kept asleep; each load starts vLLM "
                "again), or give it a GPU of its own"
            )
            out.append((model, est, [], {}, error))
            continue
        if best is None:
            room = max(capacity[k] - always[k] - asleep[k] for k in keys)
            hints = "; ".join(fit_hints(model, room)) or "a larger GPU"
            out.append(
                (
                    model,
                    est,
                    [],
                    {},
                    f"does not fit its swap group even alone: {'; '.join(lines)}; would fit with: {hints}",
                )
            )
            continue
        _, cand, need, residue, settings = best
        for key in cand:
            assigned[key] += need
            if resident:
                always[key] += need
                gpus[key].used = round(gpus[key].used + need, 3)
            else:
                asleep[key] += residue
                awake[key] = max(awake[key], (need - residue, model.name))
            gpus[key].models.add(model.name)
        out.append((model, est, [gpus[k].ref for k in cand], settings, ""))
    return out


def _group_shortfall(
    cand: list[tuple[str, int]],
    gpus: dict[tuple[str, int], _Gpu],
    capacity: dict[tuple[str, int], float],
    always: dict[tuple[str, int], float],
    asleep: dict[tuple[str, int], float],
    awake: dict[tuple[str, int], tuple[float, str]],
    need: float,
    residue: float,
) -> tuple[str | None, bool]:
    """Why a model needing ``need`` (``residue`` asleep) does not fit on GPUs ``cand`` of its swap group (None when
    it does), and whether the reason is only the residue it would keep asleep."""
    label = "+".join(gpus[k].ref.label for k in cand)
    room = min(capacity[k] - always[k] - asleep[k] for k in cand)
    if need > room + 1e-9:
        beside = [
            f"its always-resident models ({max(always[k] for k in cand):.2f} GiB)"
            if any(always[k] for k in cand)
            else "",
            f"the residue its sleeping vLLM models keep ({max(asleep[k] for k in cand):.2f} GiB)"
            if any(asleep[k] for k in cand)
            else "",
        ]
        need_s, room_s = gib_pair(need, room)
        said = " and ".join(b for b in beside if b)
        stop = " (`swap.unload: stop` on them leaves none)" if any(asleep[k] for k in cand) else ""
        return (
            f"{label} has {room_s} GiB for the group"
            + (f" beside {said}" if said else "")
            + f", it needs {need_s}{stop}",
            False,
        )
    for k in cand:
        other, name = awake[k]
        left = capacity[k] - always[k] - asleep[k] - residue
        if other > left + 1e-9:
            other_s, left_s = gib_pair(other, left)
            return (
                f"{label}: asleep it would keep {residue:.2f} GiB, leaving {left_s} GiB for model {name}, which "
                f"needs {other_s} GiB to load",
                True,
            )
    return None, False


def _candidates(
    model: Model, hosts: list[Host], gpus: dict[tuple[str, int], _Gpu], grouped: dict[tuple[str, int], str]
) -> list[list[tuple[str, int]]]:
    """GPU sets (one host each) this model's replicas may use, by its pins; a swap group's GPUs only when a pin
    names them."""
    tp = model.gpus_per_replica
    pins: list[Pin | None] = list(model.placement) or [None]
    out: list[list[tuple[str, int]]] = []
    for pin in pins:
        for host in hosts:
            if pin is not None and pin.host != host.name:
                continue
            if pin is not None and pin.gpus is not None:
                indices = [gpu_index(host, ref) for ref in pin.gpus]
                out.append([(host.name, i) for i in indices if i is not None])
                continue
            free = [i for i in range(len(host.gpus)) if (host.name, i) not in grouped]
            if tp == 1:
                out += [[(host.name, i)] for i in free]
            elif len(free) >= tp:
                # The tp GPUs with the most room, ties by index.
                ranked = sorted(free, key=lambda i: (-gpus[(host.name, i)].free, i))
                out.append([(host.name, i) for i in sorted(ranked[:tp])])
    unique: dict[tuple[tuple[str, int], ...], list[tuple[str, int]]] = {}
    for cand in out:
        unique.setdefault(tuple(cand), cand)  # first seen first, as pins list them
    return list(unique.values())


def _footprint(model: Model, est: Estimate, refs: list[GpuRef]) -> float:
    settings = backends.get(model.backend).settings(model, est, refs)
    return float(settings.get("reserved_gib", est.total_gib))


def _footprints(model: Model, est: Estimate) -> Callable[[list[GpuRef]], float]:
    """`_footprint` for one replica, once per set of GPU sizes: what a backend books depends on its GPUs' sizes
    only (vLLM's fraction of the smallest), and a fleet has few of those."""
    seen: dict[tuple[float, ...], float] = {}

    def of(refs: list[GpuRef]) -> float:
        sizes = tuple(g.vram_gib for g in refs)
        if sizes not in seen:
            seen[sizes] = _footprint(model, est, refs)
        return seen[sizes]

    return of


def _best(
    model: Model,
    est: Estimate,
    hosts: list[Host],
    gpus: dict[tuple[str, int], _Gpu],
    host_order: dict[str, int],
    grouped: dict[tuple[str, int], str],
    host_models: dict[str, set[str]],
    by_free: _ByFree,
) -> list[tuple[str, int]] | str:
    """``host_models``: the models with a replica on each host so far (a fleet-wide scan per candidate made
    placement grow with replicas × GPUs², issue 17); ``by_free``: the unpinned GPUs by free memory, which answer
    a single-GPU replica without pins at once where a host without its model has room."""
    footprint = _footprints(model, est)
    if model.gpus_per_replica == 1 and not model.placement:
        quick = by_free.best(model, host_models, footprint)
        if quick is not None:
            return quick
    candidates = _candidates(model, hosts, gpus, grouped)
    if not candidates:
        where = "the pinned hosts" if model.placement else "any host"
        return f"needs {model.gpus_per_replica} GPU(s) of one host, and {where} has fewer"
    fitting = []
    for cand in candidates:
        need = footprint([gpus[k].ref for k in cand])
        if all(gpus[k].free >= need for k in cand):
            host_has = model.name in host_models[cand[0][0]]
            gpu_has = any(model.name in gpus[k].models for k in cand)
            leftover = min(gpus[k].free - need for k in cand)
            fitting.append(((host_has, gpu_has, round(leftover, 3), host_order[cand[0][0]], cand), cand))
    if fitting:
        fitting.sort(key=lambda x: x[0])
        return fitting[0][1]
    booked = footprint([gpus[k].ref for k in candidates[0]])
    lines = []
    for cand in candidates:
        parts = []
        for k in cand:
            need_s, free_s = gib_pair(booked, gpus[k].free)
            parts.append(
                f"{gpus[k].ref.label} ({gpus[k].ref.name}, {gpus[k].ref.uuid}) has {free_s} GiB free of "
                f"{gpus[k].usable:.2f} usable ({(booked - gpus[k].free) * 1024:.0f} MiB short of {need_s})"
            )
        lines.append(", ".join(parts))
    needed = f"needs {est.total_gib:.2f} GiB per GPU"
    if abs(booked - est.total_gib) >= 0.005:
        needed += f" ({booked:.2f} as booked by {model.backend})"
    terms = " + ".join(f"{name} {gib:.2f}" for name, gib in est.terms().items())
    most = max((gpus[k].free for cand in candidates for k in cand), default=0.0)
    widest = max((len(h.gpus) for h in hosts), default=0)
    hints = [h for h in fit_hints(model, most) if not h.startswith("gpus_per_replica") or _tp(h) <= widest]
    return (
        f"{needed} ({terms}) and no GPU has room: "
        + "; ".join(lines)
        + (f"; it would fit with {'; or '.join(hints)}" if hints else "; add a GPU with more memory")
    )


def _tp(hint: str) -> int:
    """The GPU count a `gpus_per_replica N: …` hint asks for."""
    return int(hint.split()[1].rstrip(":"))


def _place_cpu(model: Model, hosts: list[Host], free: dict[str, int], models: dict[str, set[str]]) -> str | None:
    allowed = {p.host for p in model.placement} or {h.name for h in hosts}
    options = [
        (model.name in models[h.name], -free[h.name], i, h.name)
        for i, h in enumerate(hosts)
        if h.name in allowed and free[h.name] > 0
    ]
    if not options:
        return None
    host = min(options)[3]
    free[host] -= 1
    models[host].add(model.name)
    return host


def _cpu_problem(problem: ProblemAt, mi: int, model: Model, hosts: list[Host], free: dict[str, int]) -> Problem:
    allowed = {p.host for p in model.placement} or {h.name for h in hosts}
    state = ", ".join(
        f"{h.name}: {free[h.name]} of {h.cpu_workers} cpu_workers free" for h in hosts if h.name in allowed
    )
    return problem(("models", mi), f"model {model.name}: no CPU worker slot left ({state}); raise a host's cpu_workers")
