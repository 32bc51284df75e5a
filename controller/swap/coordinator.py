"""The swap coordinator's decisions: which on-demand worker is resident, what a load must evict, who waits.

One `Slot` per on-demand worker (its model has `swap`; one replica each). A request for a model that is not
resident joins that model's load (a model is never loaded twice at once) and waits, in a bounded queue and at
most the group's `max_wait_s`. A load runs under its group's lock, one at a time per group:

1. the VRAM guard: the worker's footprint on each of its GPUs against what is free there: the group's
   capacity (what the plan leaves the group) minus every other slot that is loading, resident or being
   evicted, and, where the GPU host reports it (NVML), the GPU's real free memory too. A load that could never
   fit (always-resident models hold the rest) is refused at once, with the estimate by term, the free memory,
   where that figure comes from, and the shortfall;
2. evictions: resident models of the same GPUs, never an always-resident one, none loaded less than
   `min_resident_s` ago (the thrash guard: the load waits for that instead), least recently used first, only
   as many as the load needs. A model that is not `swappable` evicts nothing: it is refused when it does not
   fit beside what is resident. Each evicted model is drained first: it answers 503 to Envoy's health check,
   Envoy stops sending it requests within a second, and the requests already on it (streams included) finish;
   only then is it unloaded. One still busy after `drain_s` is not cut: the load is given up instead;
3. the load itself, through the mover (controller/swap/movers.py), bounded by the backend's load timeout.

A user may cause at most `user_swaps_per_hour` loads per group; past that, 429 with Retry-After. Idle models
(no request in flight, none waiting) are unloaded after their `ttl`. Figures on what is in flight come from
Envoy's admin interface (the model's and the worker's clusters) plus the requests this service sends on itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from controller.plan.models import Plan, Worker
from controller.plan.vram import gib_pair
from controller.render.envoy import model_cluster, worker_cluster
from controller.spec.models import Model, SwapGroup

log = logging.getLogger("fleet.swap")

POLL_S = 0.02  # how often an eviction looks whether Envoy has taken the model out and its requests are done
RECONCILE_S = 5.0  # how often idle slots are checked against their workers
MISSING_TIMES = (
    2  # a resident worker found not loaded this many reconciles in a row is unloaded (one slow answer is not)
)
EVICT_SEEN_S = 5.0  # how long an evicted worker's health answer may take to reach Envoy before it is unloaded anyway
HOUR_S = 3600.0


def cpu_key(group: str) -> str:
    return f"cpu:{group}"


class Refused(Exception):
    """A request the coordinator cannot serve now: an HTTP status, an OpenAI-shaped message, when to retry."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None, code: str = "model_unavailable"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s
        self.code = code


class Mover(Protocol):
    """Loads and unloads one worker (controller/swap/movers.py)."""

    async def load(self, worker: Worker, model: Model) -> None: ...

    async def unload(self, worker: Worker, model: Model) -> None: ...

    async def resident(self, worker: Worker, model: Model) -> bool: ...

    async def gpu_unmanaged(self, worker: Worker) -> dict[str, float]:
        """GiB per GPU UUID of the worker's GPUs held by processes that are no worker of the fleet, as the GPU
        reports them (NVML, through the host agent); empty where unknown."""
        ...


class Traffic(Protocol):
    """Requests in flight per Envoy cluster, and whether Envoy has taken a host out of rotation."""

    async def active(self, clusters: list[str]) -> dict[str, int] | None: ...

    async def out_of_rotation(self, clusters: list[str]) -> bool | None:
        """Whether Envoy has no healthy host left in any of these clusters (None: Envoy cannot be asked)."""
        ...

    async def mark(self, clusters: list[str], worker: Worker, draining: bool) -> None:
        """Mark the worker's endpoint DRAINING in these clusters' endpoint files (or clear the mark): Envoy takes
        it out of rotation as soon as it reads the file, before its next health check would."""
        ...


@dataclass
class Slot:
    worker: Worker
    model: Model
    group: SwapGroup
    need_gib: float  # the worker's footprint on each of its GPUs
    concurrency: int
    asleep_gib: float = 0.0  # what it keeps on each of them while unloaded (a sleeping vLLM's residue)
    state: str = "unloaded"  # unloaded, loading, resident, draining, unloading
    loaded_at: float = 0.0
    last_active: float = 0.0
    waiting: int = 0  # requests held here until it is resident
    claimed: int = 0  # requests this service holds for it now: resident when they looked, not yet answered
    envoy_active: int = 0  # requests Envoy has on it (its model and worker clusters)
    loads: int = 0
    evictions: int = 0
    load_task: asyncio.Task[None] | None = None
    gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))
    last_load: dict[str, float] = field(default_factory=dict)
    last_unload: dict[str, float] = field(default_factory=dict)  # its last eviction, by phase
    last_error: str | None = None
    missing: int = 0  # reconciles in a row that found its worker not loaded while it was booked resident

    @property
    def gpus(self) -> tuple[str, ...]:
        """What it takes while loaded: its GPUs (by UUID), or one slot of a CPU group (`cpu:<group>`)."""
        if self.group.cpu_slots is not None:
            return (cpu_key(self.group.name),)
        return tuple(g.uuid for g in self.worker.gpus)

    @property
    def always(self) -> bool:
        return self.model.swap is not None and self.model.swap.resident == "always"

    @property
    def holds_gib(self) -> float:
        """What it holds on each of its GPUs now: all of its footprint unless unloaded, then its residue."""
        return self.asleep_gib if self.state == "unloaded" else self.need_gib

    @property
    def frees_gib(self) -> float:
        """What its eviction gives back on each of its GPUs."""
        return self.need_gib - self.asleep_gib

    @property
    def busy(self) -> int:
        return self.envoy_active + self.claimed

    @property
    def clusters(self) -> list[str]:
        return [model_cluster(self.model.name), worker_cluster(self.worker.name)]


class Coordinator:
    def __init__(
        self,
        plan: Plan,
        mover: Mover,
        traffic: Traffic,
        clock: Callable[[], float] = time.monotonic,
        guard_enabled: bool = True,
    ) -> None:
        self.plan = plan
        self.mover = mover
        self.traffic = traffic
        self.clock = clock
        self.guard_enabled = guard_enabled  # the thrash guard (min_resident_s); off only to measure what it saves
        groups = {g.name: g for g in plan.fleet.swap_groups}
        self.slots: dict[str, Slot] = {}
        self.by_name: dict[str, Slot] = {}
        for w in plan.on_demand():
            model = plan.model(w.model)
            assert model.swap is not None
            group = groups[model.swap.group]
            need = 1.0 if group.cpu_slots is not None else w.footprint_gib  # a CPU group counts slots
            # A vLLM worker's residue is booked from the start, though it holds nothing before its first load:
            # the plan made room for it, and counting it early never lets a load in that a later sleep overfills.
            asleep = 0.0 if group.cpu_slots is not None or model.swap.resident == "always" else w.asleep_gib
            slot = Slot(w, model, group, need, group.concurrency or model.parallel, asleep)
            slot.gate = asyncio.Semaphore(slot.concurrency)
            self.slots[w.name] = slot
            for name in model.served_names:
                self.by_name[name] = slot
        self.capacity = {u.gpu.uuid: float(u.swap_capacity_gib) for u in plan.gpus if u.swap_capacity_gib is not None}
        self.labels = {u.gpu.uuid: u.gpu.label for u in plan.gpus}
        self.reserve = {u.gpu.uuid: plan.host(u.gpu.host).reserve_vram_gib for u in plan.gpus}
        for g in groups.values():
            if g.cpu_slots is not None:
                self.capacity[cpu_key(g.name)] = float(g.cpu_slots)
                self.labels[cpu_key(g.name)] = f"{g.host}/cpu"
        self.locks = {name: asyncio.Lock() for name in groups}
        self.user_loads: dict[tuple[str, str], deque[float]] = {}
        self.refusals: dict[str, int] = {}
        self.reconciled = clock()
        self.unmanaged: dict[str, dict[str, float]] = {}  # per worker: GiB per GPU held by others (NVML), cached
        self.tasks: set[asyncio.Task[Any]] = set()

    def _background(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def watch_gpus(self) -> None:
        """What the GPUs report held by processes that are not the fleet's (through the host agents), for the VRAM
        guard: asked every RECONCILE_S, not on a load's path (it changes rarely; a load must not wait for it)."""
        for s in self.slots.values():
            if s.group.cpu_slots is None:
                try:
                    self.unmanaged[s.worker.name] = await self.mover.gpu_unmanaged(s.worker)
                except Exception as exc:  # an agent that does not answer: the plan's figures alone
                    log.warning("%s: cannot read its GPUs' memory: %s", s.worker.name, exc)

    # -- requests -------------------------------------------------------------------

    def slot_for(self, name: str) -> Slot | None:
        return self.by_name.get(name)

    async def acquire(self, slot: Slot, user: str | None) -> None:
        """Return once ``slot`` is resident, starting or joining its load; `Refused` past the group's bounds.

        It returns holding a claim on the slot, taken in the same step as it saw the slot resident (no other task
        runs in between): the slot counts as busy, so no eviction can come between the load and the request it
        was for. The caller gives it back with `release` (or `serving`), exactly once."""
        if slot.state == "resident":
            slot.claimed += 1
            return
        group = slot.group
        if slot.waiting >= group.max_queue:
            raise self._refuse(
                slot,
                "queue",
                Refused(
                    429,
                    f"model {slot.model.name} is loading and {slot.waiting} requests already wait for it (the "
                    f"swap group's max_queue); retry shortly",
                    retry_after_s=5,
                    code="queue_full",
                ),
            )
        slot.waiting += 1
        deadline = self.clock() + group.max_wait_s
        try:
            while slot.state != "resident":
                task = slot.load_task
                if task is None or task.done():
                    self._count_user_load(slot, user)
                    task = slot.load_task = asyncio.create_task(self._load(slot, deadline))
                left = deadline - self.clock()
                try:
                    await asyncio.wait_for(asyncio.shield(task), timeout=max(0.0, left))
                except TimeoutError:
                    raise self._refuse(
                        slot,
                        "wait",
                        Refused(
                            503,
                            f"model {slot.model.name} is not loaded after {group.max_wait_s:g}s (the swap group's "
                            f"max_wait_s); retry later",
                            retry_after_s=10,
                        ),
                    ) from None
            slot.claimed += 1
        finally:
            slot.waiting -= 1

    def release(self, slot: Slot) -> None:
        slot.claimed -= 1
        slot.last_active = self.clock()

    @contextlib.asynccontextmanager
    async def serving(self, slot: Slot) -> AsyncIterator[None]:
        """Around a request this service sends on, after its `acquire`: at most the slot's concurrency at once, in
        arrival order; the claim is given back at the end."""
        try:
            async with slot.gate:
                slot.last_active = self.clock()
                yield
        finally:
            self.release(slot)

    def _count_user_load(self, slot: Slot, user: str | None) -> None:
        if user is None:
            return
        key = (slot.group.name, user)
        times = self.user_loads.setdefault(key, deque())
        now = self.clock()
        while times and now - times[0] > HOUR_S:
            times.popleft()
        if len(times) >= slot.group.user_swaps_per_hour:
            wait = HOUR_S - (now - times[0])
            raise self._refuse(
                slot,
                "user_swaps",
                Refused(
                    429,
                    f"user {user} caused {len(times)} model loads in swap group {slot.group.name} in the last hour "
                    f"(its user_swaps_per_hour); {slot.model.name} is not loaded now, retry in {wait:.0f}s",
                    retry_after_s=wait,
                    code="rate_limit_exceeded",
                ),
            )
        times.append(now)

    def _refuse(self, slot: Slot, reason: str, refused: Refused) -> Refused:
        key = f"{slot.worker.name}:{reason}"
        self.refusals[key] = self.refusals.get(key, 0) + 1
        slot.last_error = refused.message
        return refused

    # -- loading --------------------------------------------------------------------

    def booked(self, uuid: str, but: Slot | None = None) -> float:
        """Memory the coordinator's slots hold on a GPU (loading, resident or on their way out; a sleeping vLLM its
        residue)."""
        return sum(s.holds_gib for s in self.slots.values() if s is not but and uuid in s.gpus)

    async def _load(self, slot: Slot, deadline: float) -> None:
        async with self.locks[slot.group.name]:
            if slot.state == "resident":
                return
            began = self.clock()
            unload_s = 0.0
            while True:
                plan = await self._evictions(slot)
                if isinstance(plan, float):
                    if plan > deadline:
                        raise self._refuse(
                            slot,
                            "thrash_guard",
                            Refused(
                                503,
                                f"model {slot.model.name}: the models it would evict were loaded less than "
                                f"{slot.group.min_resident_s:g}s ago (min_resident_s) and stay until "
                                f"{plan - self.clock():.0f}s from now; retry then",
                                retry_after_s=max(1.0, plan - self.clock()),
                            ),
                        )
                    await asyncio.sleep(max(0.05, plan - self.clock()))
                    continue
                if not plan:
                    break
                t0 = self.clock()
                await asyncio.gather(*(self._evict(v) for v in plan))
                unload_s += self.clock() - t0
            slot.state = "loading"
            t1 = self.clock()
            try:
                await self.mover.load(slot.worker, slot.model)
            except Exception as exc:  # any failure of the backend: the slot is freed and the waiters told why
                slot.state = "unloaded"
                with contextlib.suppress(Exception):
                    await self.mover.unload(slot.worker, slot.model)
                raise self._refuse(
                    slot, "load_failed", Refused(503, f"loading model {slot.model.name} failed: {exc}", 10)
                ) from None
            now = self.clock()
            slot.state, slot.loaded_at, slot.last_active, slot.missing = "resident", now, now, 0
            # Off the request's path: Envoy's health check brings it into rotation either way.
            self._background(self.traffic.mark(slot.clusters, slot.worker, False))
            slot.loads += 1
            slot.last_error = None
            slot.last_load = {
                "unload_s": round(unload_s, 3),
                "load_s": round(now - t1, 3),
                "total_s": round(now - began, 3),
            }
            log.info("loaded %s in %.2fs (evictions %.2fs)", slot.worker.name, now - t1, unload_s)

    async def _evictions(self, slot: Slot) -> list[Slot] | float:
        """The slots to evict so ``slot`` fits (empty: it fits now), or when to look again (the thrash guard);
        `Refused` when it cannot fit."""
        # Memory the GPU reports held by processes that are not the fleet's, beyond what the host reserves for such
        # (the driver, a display): the plan cannot know it, and no eviction frees it.
        unmanaged = self.unmanaged.get(slot.worker.name, {})
        foreign = {u: max(0.0, unmanaged.get(u, 0.0) - self.reserve.get(u, 0.0)) for u in slot.gpus}
        source = {u: "NVML" if foreign[u] > 0 else "plan" for u in slot.gpus}
        free = {u: self.capacity[u] - self.booked(u, but=slot) - foreign[u] for u in slot.gpus}
        short = {u: slot.need_gib - free[u] for u in slot.gpus}
        if all(s <= 1e-9 for s in short.values()):
            return []
        others = [s for s in self.slots.values() if s is not slot and not s.always and set(s.gpus) & set(slot.gpus)]
        for u in slot.gpus:
            possible = free[u] + sum(s.frees_gib for s in others if u in s.gpus and s.state != "unloaded")
            if possible + 1e-9 < slot.need_gib:
                raise self._refuse(slot, "vram", Refused(503, self.shortfall(slot, u, free[u], source[u]), 60))
        if slot.model.swap is not None and not slot.model.swap.swappable:
            u = max(short, key=lambda k: short[k])
            raise self._refuse(
                slot,
                "not_swappable",
                Refused(
                    503,
                    self.shortfall(slot, u, free[u], source[u])
                    + "; it is not swappable (swap.swappable: false), so it does not evict "
                    + ", ".join(s.model.name for s in others if s.state == "resident"),
                    30,
                ),
            )
        now = self.clock()
        min_s = slot.group.min_resident_s if self.guard_enabled else 0.0
        # Requests that waited for a model's load are sent on as soon as they resume: not evicted under them.
        resident = [s for s in others if s.state == "resident" and not s.waiting]
        ready = sorted((s for s in resident if now - s.loaded_at >= min_s), key=lambda s: (s.last_active, s.loaded_at))
        chosen: list[Slot] = []
        left = dict(short)
        for s in ready:
            if all(v <= 1e-9 for v in left.values()):
                break
            if any(left[u] > 1e-9 for u in s.gpus if u in left):
                chosen.append(s)
                for u in s.gpus:
                    if u in left:
                        left[u] -= s.frees_gib
        if all(v <= 1e-9 for v in left.values()):
            return chosen
        # Not enough can go now: look again when the next one passes its minimum residency, or a transition ends.
        later = [s.loaded_at + min_s for s in resident if now - s.loaded_at < min_s]
        return min(later) if later else now + POLL_S

    async def _evict(self, victim: Slot) -> None:
        """Drain ``victim`` (out of Envoy's rotation, its requests finished) and unload it."""
        victim.state = "draining"
        began = self.clock()
        await self.traffic.mark(victim.clusters, victim.worker, True)
        marked = self.clock()
        while self.clock() - began < EVICT_SEEN_S:
            if (await self.traffic.out_of_rotation(victim.clusters)) in (None, True):
                break
            await asyncio.sleep(POLL_S)
        seen = self.clock()
        while True:
            await self.refresh()
            if victim.busy == 0:
                break
            if self.clock() - began > victim.group.drain_s:
                victim.state = "resident"
                await self.traffic.mark(victim.clusters, victim.worker, False)
                raise self._refuse(
                    victim,
                    "drain",
                    Refused(
                        503,
                        f"model {victim.model.name} still serves {victim.busy} request(s) after "
                        f"{victim.group.drain_s:g}s (the swap group's drain_s); it is not cut off, so the load "
                        "waits; retry later",
                        30,
                    ),
                )
            await asyncio.sleep(POLL_S)
        victim.state = "unloading"
        drained = self.clock()
        try:
            await self.mover.unload(victim.worker, victim.model)
        except Exception as exc:
            # Still holding its memory as far as anyone knows: keep it booked and say so.
            victim.state = "resident"
            await self.traffic.mark(victim.clusters, victim.worker, False)
            raise self._refuse(
                victim, "unload_failed", Refused(503, f"unloading model {victim.model.name} failed: {exc}", 30)
            ) from None
        victim.state = "unloaded"
        victim.evictions += 1
        done = self.clock()
        victim.last_unload = {
            "mark_s": round(marked - began, 3),
            "out_of_rotation_s": round(seen - marked, 3),
            "drained_s": round(drained - seen, 3),
            "stop_s": round(done - drained, 3),
        }
        log.info("unloaded %s: %s", victim.worker.name, victim.last_unload)

    def shortfall(self, slot: Slot, uuid: str, free: float, source: str) -> str:
        """The VRAM guard's refusal: the estimate by term, the GPU's free memory and where it comes from, the
        shortfall."""
        others = [s for s in self.slots.values() if s is not slot and uuid in s.gpus]
        held = [s.model.name for s in others if s.state != "unloaded"]
        asleep = [s for s in others if s.state == "unloaded" and s.asleep_gib]
        if slot.group.cpu_slots is not None:
            return (
                f"model {slot.model.name} needs one of the {slot.group.cpu_slots} CPU slot(s) of swap group "
                f"{slot.group.name} on host {slot.group.host}, and {len(held)} are taken ({', '.join(held)})"
            )
        est = slot.worker.estimate
        terms = " + ".join(
            f"{name} {gib:.2f}" for name, gib in {"weights": 0.0, "kv cache": 0.0, **est.terms()}.items()
        )
        need_s, free_s = gib_pair(slot.need_gib, free)
        short_mib = (slot.need_gib - free) * 1024
        where = (
            "as the GPU reports it (NVML: the group's capacity less what is loaded and what processes that are not "
            "the fleet's hold)"
            if source == "NVML"
            else "by the plan: the group's capacity less what is loaded"
        )
        return (
            f"model {slot.model.name} needs {need_s} GiB on {self.labels.get(uuid, uuid)} ({uuid}) "
            f"(estimate {terms}; booked {slot.need_gib:.3f}) and that GPU has {free_s} GiB free {where}"
            + (f" while {', '.join(held)} {'is' if len(held) == 1 else 'are'} loaded" if held else "")
            + (
                f" ({', '.join(s.model.name for s in asleep)} asleep keep "
                f"{sum(s.asleep_gib for s in asleep):.2f} GiB: vLLM's sleep residue)"
                if asleep
                else ""
            )
            + f": {short_mib:.0f} MiB short; free the GPU, lower the model's context or parallel, or quantize"
        )

    # -- upkeep ---------------------------------------------------------------------

    async def refresh(self) -> None:
        """What Envoy has in flight on each slot, from its admin interface."""
        clusters = [c for s in self.slots.values() for c in s.clusters]
        active = await self.traffic.active(clusters)
        now = self.clock()
        for s in self.slots.values():
            s.envoy_active = sum((active or {}).get(c, 0) for c in s.clusters)
            if s.busy or s.waiting:
                s.last_active = now

    async def reconcile(self) -> None:
        """What each idle slot's worker really is (a deploy recreated it, an operator stopped or started it): a
        resident slot whose worker is gone is unloaded, an unloaded one whose worker runs is resident."""
        for s in self.slots.values():
            if s.state not in ("resident", "unloaded") or s.busy or s.waiting or self.locks[s.group.name].locked():
                continue
            before = (s.state, s.loads, s.evictions)
            try:
                really = await self.mover.resident(s.worker, s.model)
            except Exception as exc:  # an agent that does not answer: nothing learned
                log.warning("%s: cannot tell whether it is loaded: %s", s.worker.name, exc)
                continue
            if self.locks[s.group.name].locked() or s.busy or s.waiting or (s.state, s.loads, s.evictions) != before:
                continue  # a load, an eviction or a request came meanwhile: the answer is stale, and it decides
            if s.state == "resident" and not really:
                # Booked as resident, it holds GPU memory as far as the loads of its group know: one answer that
                # says otherwise (a health probe that timed out on a busy host) must not free it for another load.
                s.missing += 1
                if s.missing < MISSING_TIMES:
                    log.warning("%s: found not loaded once; asked again at the next reconcile", s.worker.name)
                    continue
                log.warning("%s: found not loaded (stopped or redeployed behind the coordinator)", s.worker.name)
                s.state, s.missing = "unloaded", 0
                continue
            s.missing = 0
            if s.state == "unloaded" and really:
                log.warning("%s: found loaded (started behind the coordinator): counted as resident", s.worker.name)
                now = self.clock()
                s.state, s.loaded_at, s.last_active = "resident", now - s.group.min_resident_s, now

    async def tick(self) -> None:
        """Once a second: refresh the in-flight figures; unload models idle past their ttl; every RECONCILE_S,
        reconcile with what the workers really are."""
        await self.refresh()
        now = self.clock()
        if now - self.reconciled >= RECONCILE_S:
            self.reconciled = now
            await self.reconcile()
            await self.watch_gpus()
        for s in self.slots.values():
            ttl = s.model.swap.ttl_s if s.model.swap is not None else None
            if ttl is None or s.always or s.state != "resident" or s.busy or s.waiting:
                continue
            if now - s.last_active >= ttl:
                lock = self.locks[s.group.name]
                if lock.locked():
                    continue
                async with lock:
                    if s.state == "resident" and not s.busy and not s.waiting:
                        log.info("%s idle for %.0fs (ttl): unloading", s.worker.name, now - s.last_active)
                        with contextlib.suppress(Refused):
                            await self._evict(s)

    async def start(self) -> None:
        """Learn what is resident already (a restarted coordinator), then load the always-resident and preloaded
        models, in that order."""
        await self.watch_gpus()
        now = self.clock()
        for s in self.slots.values():
            await self.traffic.mark(s.clusters, s.worker, False)  # a mark a previous coordinator left
            try:
                if await self.mover.resident(s.worker, s.model):
                    s.state, s.loaded_at, s.last_active = "resident", now - s.group.min_resident_s, now
            except Exception as exc:  # an unreachable worker is not resident
                log.warning("%s: cannot tell whether it is loaded: %s", s.worker.name, exc)
        first = [s for s in self.slots.values() if s.always]
        then = [s for s in self.slots.values() if not s.always and s.model.swap is not None and s.model.swap.preload]
        for s in [*first, *then]:
            if s.state == "resident":
                continue
            try:
                await self.acquire(s, None)
                self.release(s)
            except Refused as exc:
                log.warning("%s: not loaded at start: %s", s.worker.name, exc.message)

    async def load(self, name: str, user: str | None = None) -> Slot:
        slot = self._named(name)
        await self.acquire(slot, user)
        self.release(slot)
        return slot

    async def unload(self, name: str) -> Slot:
        slot = self._named(name)
        async with self.locks[slot.group.name]:
            if slot.state == "resident":
                await self._evict(slot)
        return slot

    def _named(self, name: str) -> Slot:
        slot = self.slots.get(name) or self.by_name.get(name)
        if slot is None:
            known = ", ".join(sorted({s.model.name for s in self.slots.values()})) or "none"
            raise Refused(404, f"no on-demand model or worker {name!r}; on-demand models: {known}", code="not_found")
        return slot

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "workers": {
                s.worker.name: {
                    "model": s.model.name,
                    "group": s.group.name,
                    "gpus": list(s.gpus),
                    "state": s.state,
                    "resident_for_s": round(now - s.loaded_at, 1) if s.state == "resident" else None,
                    "idle_s": round(now - s.last_active, 1) if s.state == "resident" else None,
                    "waiting": s.waiting,
                    "in_flight": s.busy,
                    "loads": s.loads,
                    "evictions": s.evictions,
                    "need_gib": s.need_gib,
                    "asleep_gib": s.asleep_gib,
                    "last_load": s.last_load or None,
                    "last_unload": s.last_unload or None,
                    "last_error": s.last_error,
                }
                for s in self.slots.values()
            },
            "gpus": {
                u: {"label": self.labels.get(u), "capacity_gib": c, "booked_gib": round(self.booked(u), 3)}
                for u, c in self.capacity.items()
            },
            "refusals": dict(self.refusals),
        }
