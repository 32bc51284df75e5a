"""The swap coordinator's decisions (controller/swap/coordinator.py) with a recording mover and a scripted Envoy.

The real chain (Envoy, the coordinator's service, llama-server processes) is tests/e2e/test_swap.py; here each
rule is driven to its edge: one load for many requests, least recently used first, the thrash guard, always
resident, not swappable, the queue and wait bounds, the per-user limit, drains that never cut, the ttl.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.errors import PlanError
from controller.plan import make_plan
from controller.plan.models import Plan, Worker
from controller.spec import load_spec
from controller.spec.models import Model
from controller.swap.coordinator import Coordinator, Refused

GPU = "GPU-00000000-0000-4000-8000-0000000000e1"
ARCH = {"layers": 2, "kv_heads": 2, "head_dim": 16, "params_b": 0.01}


def spec(tmp_path: Path, fits: float = 2.2, group: dict[str, Any] | None = None, **models: dict[str, Any]) -> Plan:
    """A host with one GPU of ``fits`` times what one model books (2.2: two fit at once, not three), as one swap
    group of the models named (default a, b, c), each with its `swap` settings."""
    probe = _spec(tmp_path, 1000.0, group, models)
    return _spec(tmp_path, round(fits * probe.workers[0].footprint_gib, 3), group, models)


def _spec(
    tmp_path: Path,
    vram: float,
    group: dict[str, Any] | None,
    models: dict[str, dict[str, Any]],
    fields: dict[str, dict[str, Any]] | None = None,
) -> Plan:
    data = {
        "version": 1,
        "name": "swap",
        "mesh": {"kind": "none"},
        "hosts": [
            {
                "name": "local",
                "address": "127.0.0.1",
                "reserve_vram_gib": 0,
                "gpus": [{"uuid": GPU, "name": "Test GPU", "vram_gib": vram}],
            }
        ],
        "swap_groups": [{"name": "g", "host": "local", "min_resident_s": 0, **(group or {})}],
        "models": [
            {
                "name": name,
                "backend": "llamacpp",
                "source": {"gguf": "m.gguf"},
                "arch": ARCH,
                "context": 512,
                "swap": {"group": "g", **swap},
                **(fields or {}).get(name, {}),
            }
            for name, swap in (models or {"a": {}, "b": {}, "c": {}}).items()
        ],
        "gateway": {"host": "local", "public_name": "localhost", "tls": {"mode": "internal"}},
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return make_plan(load_spec(path))


# A vLLM model of 3B parameters: 8 GiB booked awake, 4.75 GiB kept asleep (the residue vllm-project/vllm#17117
# reports, the estimate's floor).
VLLM: dict[str, Any] = {"backend": "vllm", "source": {"huggingface": "org/m"}, "arch": {**ARCH, "params_b": 3}}


def vllm_spec(tmp_path: Path, vram: float, names: dict[str, str]) -> Plan:
    """One GPU of ``vram`` GiB as one swap group of the models named, each of the backend named (vllm or llamacpp)."""
    fields = {name: VLLM for name, backend in names.items() if backend == "vllm"}
    return _spec(tmp_path, vram, None, {name: {} for name in names}, fields)


class Mover:
    def __init__(self, load_s: float = 0.0) -> None:
        self.load_s = load_s
        self.calls: list[tuple[str, str]] = []
        self.resident_now: set[str] = set()
        self.fail: set[str] = set()
        self.release = asyncio.Event()
        self.block = False
        self.unmanaged: dict[str, float] = {}  # GiB per GPU held by processes that are not the fleet's

    async def load(self, worker: Worker, model: Model) -> None:
        self.calls.append(("load", model.name))
        if self.block:
            await self.release.wait()
        await asyncio.sleep(self.load_s)
        if model.name in self.fail:
            raise RuntimeError("it exited with 1")
        self.resident_now.add(model.name)

    async def unload(self, worker: Worker, model: Model) -> None:
        self.calls.append(("unload", model.name))
        self.resident_now.discard(model.name)

    async def resident(self, worker: Worker, model: Model) -> bool:
        return model.name in self.resident_now

    async def gpu_unmanaged(self, worker: Worker) -> dict[str, float]:
        return dict(self.unmanaged)


class Traffic:
    """Envoy as the test scripts it: requests in flight per model, and hosts out of rotation."""

    def __init__(self) -> None:
        self.busy: dict[str, int] = {}
        self.asked_out: list[str] = []
        self.marks: list[tuple[str, bool]] = []

    async def active(self, clusters: list[str]) -> dict[str, int]:
        return {c: self.busy.get(c.removeprefix("model_"), 0) for c in clusters if c.startswith("model_")}

    async def out_of_rotation(self, clusters: list[str]) -> bool:
        self.asked_out += clusters
        return True

    async def mark(self, clusters: list[str], worker: Worker, draining: bool) -> None:
        self.marks.append((worker.model, draining))


async def ask(c: Coordinator, slot: Any, user: str | None) -> None:
    """One request: wait until resident, then done (its claim given back)."""
    await c.acquire(slot, user)
    c.release(slot)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


def test_each_model_alone_must_fit_its_group(tmp_path: Path) -> None:
    with pytest.raises(PlanError) as caught:
        spec(tmp_path, fits=0.8)
    message = str(caught.value.problems[0])
    assert "does not fit its swap group even alone" in message and "GiB for the group, it needs" in message, message


def test_the_plan_shows_what_is_resident_at_most_at_once(tmp_path: Path) -> None:
    plan = spec(tmp_path)
    (use,) = plan.gpus
    assert use.swap_group == "g" and use.swap_capacity_gib == use.usable_gib
    assert len(use.workers) == 3 and use.used_gib == 0.0  # on-demand models book nothing for themselves
    assert plan.resident_at_most(use) == ["a-local-gpu0", "b-local-gpu0"]  # 2 of the 2.2 that would fit


def test_a_sleeping_vllm_keeps_its_residue_booked_in_the_plan(tmp_path: Path) -> None:
    """Each of two vLLM models fits the GPU alone (about 7 GiB of 10), but while one is awake the other sleeps and
    keeps 4.75 GiB: the plan refuses, naming the residue; with 13 GiB it plans them, one resident at a time."""
    with pytest.raises(PlanError) as caught:
        vllm_spec(tmp_path, 10.0, {"a": "vllm", "b": "vllm"})
    message = str(caught.value.problems[0])
    found = re.search(
        r"has 5\.25 GiB for the group beside the residue its sleeping vLLM models keep \(4\.75 GiB\), "
        r"it needs ([0-9.]+)",
        message,
    )
    assert found and 5.25 < float(found[1]) <= 10, message
    plan = vllm_spec(tmp_path, 13.0, {"a": "vllm", "b": "vllm"})
    (use,) = plan.gpus
    assert [w.asleep_gib for w in plan.workers] == [4.75, 4.75]
    assert all(w.footprint_gib + 4.75 <= 13 < 2 * w.footprint_gib for w in plan.workers)
    assert plan.resident_at_most(use) == ["a-local-gpu0"]  # one awake beside the other's residue; not two awake


def test_a_later_vllm_model_may_not_leave_an_earlier_one_no_room_to_wake(tmp_path: Path) -> None:
    """A llama.cpp model (the larger, so placed first) fits the GPU alone, and so does a vLLM model; but asleep the
    vLLM would keep 4.75 GiB and leave the llama.cpp model too little to load: refused, with both numbers."""
    fields = {"l": {"arch": {**ARCH, "params_b": 4}}, "v": VLLM}
    alone = {w.model: w.footprint_gib for w in _spec(tmp_path, 100.0, None, {"l": {}, "v": {}}, fields).workers}
    vram = round(max(alone.values()) + 0.5, 3)
    assert alone["l"] > alone["v"] and alone["l"] + 4.75 > vram
    with pytest.raises(PlanError) as caught:
        _spec(tmp_path, vram, None, {"l": {}, "v": {}}, fields)
    message = str(caught.value.problems[0])
    assert "model v: fits its swap group alone, but asleep (vLLM sleep mode) it would leave" in message, message
    found = re.search(
        r"asleep it would keep 4\.75 GiB, leaving ([0-9.]+) GiB for model l, which needs ([0-9.]+)", message
    )
    assert found and float(found[1]) < float(found[2]) == pytest.approx(alone["l"], abs=0.005), message
    assert "set `swap.unload: stop` on it" in message and "would fit with" not in message, message


def test_a_sleeping_vllm_holds_its_residue_in_the_coordinator(tmp_path: Path) -> None:
    """Loading b evicts a, which sleeps: the GPU stays booked with b and a's residue."""
    plan = vllm_spec(tmp_path, 13.0, {"a": "vllm", "b": "vllm"})

    async def go() -> tuple[list[tuple[str, str]], float, float, float]:
        mover = Mover()
        c = Coordinator(plan, mover, Traffic())
        await c.load("a")
        await c.load("b")
        return mover.calls, c.booked(GPU), c.slots["a-local-gpu0"].holds_gib, c.slots["b-local-gpu0"].need_gib

    calls, booked, holds, need = run(go())
    assert calls == [("load", "a"), ("unload", "a"), ("load", "b")]
    assert holds == 4.75 and booked == pytest.approx(need + 4.75)


def test_the_guard_counts_a_sleeping_vllms_residue(tmp_path: Path) -> None:
    """A llama.cpp model loads beside a sleeping vLLM's residue; once memory that is not the fleet's appears
    (NVML), its next load is refused with numbers that name the sleeping model, and nothing is evicted: putting
    the vLLM to sleep again would free nothing."""
    fields = {"v": VLLM, "l": {"arch": {**ARCH, "params_b": 3}}}
    llama = _spec(tmp_path, 100.0, None, {"l": {}}, fields).workers[0].footprint_gib
    plan = _spec(tmp_path, round(llama + 4.75 + 0.5, 3), None, {"v": {}, "l": {}}, fields)

    async def go() -> tuple[float, float, Refused, list[tuple[str, str]]]:
        mover = Mover()
        c = Coordinator(plan, mover, Traffic())
        await c.load("v")
        await c.load("l")  # v sleeps: l fits beside its residue
        booked, holds = c.booked(GPU), c.slots["v-local-gpu0"].holds_gib
        await c.unload("l")
        mover.unmanaged = {GPU: 1.0}
        await c.watch_gpus()
        with pytest.raises(Refused) as caught:
            await c.load("l")
        return booked, holds, caught.value, mover.calls

    booked, holds, refused, calls = run(go())
    assert holds == 4.75 and booked == pytest.approx(llama + 4.75)
    assert calls == [("load", "v"), ("unload", "v"), ("load", "l"), ("unload", "l")]
    assert "(v asleep keep 4.75 GiB: vLLM's sleep residue)" in refused.message, refused.message
    assert "MiB short" in refused.message


def test_many_requests_for_a_model_cause_one_load(tmp_path: Path) -> None:
    async def go() -> Mover:
        mover = Mover(load_s=0.2)
        c = Coordinator(spec(tmp_path), mover, Traffic())
        slot = c.slot_for("a")
        assert slot is not None
        await asyncio.gather(*(ask(c, slot, "u") for _ in range(20)))
        return mover

    assert run(go()).calls == [("load", "a")]


def test_eviction_takes_the_least_recently_used(tmp_path: Path) -> None:
    async def go() -> list[tuple[str, str]]:
        mover = Mover()
        c = Coordinator(spec(tmp_path), mover, Traffic())
        await c.load("a")
        await c.load("b")
        c.slots["a-local-gpu0"].last_active = time.monotonic()  # a was used after b
        await c.load("c")
        assert c.slots["b-local-gpu0"].state == "unloaded" and c.slots["a-local-gpu0"].state == "resident"
        return mover.calls

    assert run(go()) == [("load", "a"), ("load", "b"), ("unload", "b"), ("load", "c")]


def test_the_thrash_guard_keeps_a_fresh_model_resident_for_its_minimum(tmp_path: Path) -> None:
    plan = spec(tmp_path, fits=1.1, group={"min_resident_s": 0.6})

    async def go(guard: bool) -> float:
        c = Coordinator(plan, Mover(), Traffic(), guard_enabled=guard)
        await c.load("a")
        began = time.monotonic()
        await c.load("b")  # only one fits: a must go, but it was loaded just now
        return time.monotonic() - began

    assert run(go(True)) >= 0.55
    assert run(go(False)) < 0.3


def test_a_model_resident_always_is_never_evicted(tmp_path: Path) -> None:
    plan = spec(tmp_path, fits=2.1, a={"resident": "always"}, b={}, c={})

    async def go() -> None:
        mover = Mover()
        c = Coordinator(plan, mover, Traffic())
        await c.start()  # loads a
        await c.load("b")
        await c.load("c")  # b goes, never a
        assert ("unload", "a") not in mover.calls
        assert c.slots["a-local-gpu0"].state == "resident" and c.slots["c-local-gpu0"].state == "resident"

    run(go())


def test_a_model_that_is_not_swappable_is_refused_with_the_numbers(tmp_path: Path) -> None:
    plan = spec(tmp_path, fits=1.1, a={}, b={"swappable": False})

    async def go() -> Refused:
        c = Coordinator(plan, Mover(), Traffic())
        await c.load("a")
        with pytest.raises(Refused) as caught:
            await c.load("b")
        await c.unload("a")
        await c.load("b")  # with the GPU free it loads
        return caught.value

    refused = run(go())
    assert refused.status == 503 and refused.retry_after_s
    m = refused.message
    assert "model b needs " in m and "local/gpu0" in m and "GiB free by the plan" in m, m
    assert "weights" in m and "kv cache" in m and "overhead" in m and "MiB short" in m and "while a is loaded" in m, m


def test_the_guard_shows_enough_precision_that_need_and_free_differ(tmp_path: Path) -> None:
    plan = spec(tmp_path, fits=1.1, a={}, b={"swappable": False})

    async def go() -> str:
        c = Coordinator(plan, Mover(), Traffic())
        slot = c.slots["b-local-gpu0"]
        return c.shortfall(slot, GPU, slot.need_gib - 1 / 1024, "NVML")

    message = run(go())
    assert "1 MiB short" in message and "as the GPU reports it (NVML" in message, message
    need, free = message.split("needs ")[1].split(" GiB")[0], message.split("has ")[1].split(" GiB")[0]
    assert need != free, message


def test_the_queue_and_the_wait_are_bounded(tmp_path: Path) -> None:
    plan = spec(tmp_path, group={"max_queue": 3, "max_wait_s": 0.5})

    async def go() -> list[Any]:
        mover = Mover()
        mover.block = True  # the load never ends
        c = Coordinator(plan, mover, Traffic())
        slot = c.slot_for("a")
        assert slot is not None
        waiting = [asyncio.create_task(c.acquire(slot, "u")) for _ in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(Refused) as full:
            await c.acquire(slot, "u")
        results = await asyncio.gather(*waiting, return_exceptions=True)
        return [full.value, *results]

    full, *waited = run(go())
    assert full.status == 429 and full.code == "queue_full" and full.retry_after_s
    assert [(r.status, "max_wait_s" in r.message) for r in waited] == [(503, True)] * 3


def test_one_user_cannot_keep_the_gpu_loading(tmp_path: Path) -> None:
    plan = spec(tmp_path, fits=1.1, group={"user_swaps_per_hour": 2})

    async def go() -> Refused:
        c = Coordinator(plan, Mover(), Traffic())
        await ask(c, c.slots["a-local-gpu0"], "mallory")
        await ask(c, c.slots["b-local-gpu0"], "mallory")
        with pytest.raises(Refused) as caught:
            await ask(c, c.slots["c-local-gpu0"], "mallory")
        await ask(c, c.slots["c-local-gpu0"], "alice")  # another user still may
        return caught.value

    refused = run(go())
    assert refused.status == 429 and "user mallory caused 2 model loads" in refused.message
    assert refused.retry_after_s is not None and 3500 < refused.retry_after_s <= 3600


def test_an_eviction_waits_for_the_requests_in_flight_and_never_cuts_them(tmp_path: Path) -> None:
    plan = spec(tmp_path, fits=1.1, group={"drain_s": 0.5})

    async def go() -> tuple[float, Refused, list[tuple[str, str]], list[str]]:
        mover, traffic = Mover(), Traffic()
        c = Coordinator(plan, mover, traffic)
        await c.load("a")
        traffic.busy["a"] = 1  # a stream on a

        async def finish() -> None:
            await asyncio.sleep(0.3)
            traffic.busy["a"] = 0

        began = time.monotonic()
        await asyncio.gather(c.load("b"), finish())
        waited = time.monotonic() - began
        traffic.busy["b"] = 1  # and now one that outlasts drain_s
        with pytest.raises(Refused) as caught:
            await c.load("c")
        assert c.slots["b-local-gpu0"].state == "resident"  # kept, not cut
        return waited, caught.value, mover.calls, traffic.asked_out

    waited, refused, calls, asked = run(go())
    assert waited >= 0.28
    assert calls == [("load", "a"), ("unload", "a"), ("load", "b")]
    assert refused.status == 503 and "still serves 1 request(s) after 0.5s" in refused.message
    assert "model_a" in asked, "the coordinator did not wait for Envoy to take a out of rotation"


def test_an_idle_model_is_unloaded_after_its_ttl(tmp_path: Path) -> None:
    plan = spec(tmp_path, a={"ttl": "1s"}, b={})

    async def go() -> tuple[str, str]:
        mover, traffic = Mover(), Traffic()
        c = Coordinator(plan, mover, traffic)
        await c.load("a")
        await c.load("b")
        traffic.busy["a"] = 1
        await asyncio.sleep(1.1)
        await c.tick()  # busy: kept
        kept = c.slots["a-local-gpu0"].state
        traffic.busy["a"] = 0
        await c.tick()
        await asyncio.sleep(1.1)
        await c.tick()
        return kept, c.slots["a-local-gpu0"].state

    kept, after = run(go())
    assert (kept, after) == ("resident", "unloaded")


def test_a_failed_load_is_told_to_every_waiter_and_tried_again_later(tmp_path: Path) -> None:
    async def go() -> tuple[list[Any], str]:
        mover = Mover()
        mover.fail.add("a")
        c = Coordinator(spec(tmp_path), mover, Traffic())
        slot = c.slots["a-local-gpu0"]
        results = await asyncio.gather(*(ask(c, slot, "u") for _ in range(3)), return_exceptions=True)
        mover.fail.clear()
        await ask(c, slot, "u")
        return results, slot.state

    results, state = run(go())
    assert all(isinstance(r, Refused) and "loading model a failed: it exited with 1" in r.message for r in results)
    assert state == "resident"


def test_a_restarted_coordinator_learns_what_is_resident(tmp_path: Path) -> None:
    async def go() -> dict[str, str]:
        mover = Mover()
        mover.resident_now = {"b"}
        c = Coordinator(spec(tmp_path, b={"preload": True}, a={}), mover, Traffic())
        await c.start()
        assert ("load", "b") not in mover.calls  # already there: not loaded twice
        return {s.model.name: s.state for s in c.slots.values()}

    assert run(go()) == {"a": "unloaded", "b": "resident"}


def test_it_reconciles_with_workers_changed_behind_its_back(tmp_path: Path) -> None:
    """A deploy recreated a resident worker (stopped), or an operator started one: the next reconcile follows."""

    async def go() -> tuple[dict[str, str], dict[str, str]]:
        mover = Mover()
        c = Coordinator(spec(tmp_path), mover, Traffic())
        await c.load("a")
        mover.resident_now = {"b"}  # a was stopped, b started, neither by the coordinator
        await c.reconcile()
        first = {s.model.name: s.state for s in c.slots.values()}
        await c.reconcile()
        return first, {s.model.name: s.state for s in c.slots.values()}

    first, second = run(go())
    # One answer that a booked model is gone is not enough to free its memory (a probe that timed out); two are.
    assert first == {"a": "resident", "b": "resident", "c": "unloaded"}
    assert second == {"a": "unloaded", "b": "resident", "c": "unloaded"}


def test_a_slow_answer_does_not_undo_what_happened_meanwhile(tmp_path: Path) -> None:
    """A reconcile asks whether a is loaded; before the answer comes, a is evicted. The answer ("loaded", true
    when it was given) is stale and must not book a as resident again (the GPU would be over-booked: the CI run
    that found this had Ollama keep a model the coordinator thought it had unloaded)."""

    class Slow(Mover):
        def __init__(self) -> None:
            super().__init__()
            self.asked = asyncio.Event()
            self.answer = asyncio.Event()

        async def resident(self, worker: Worker, model: Model) -> bool:
            was = model.name in self.resident_now
            if model.name == "a":
                self.asked.set()
                await self.answer.wait()
            return was

    async def go() -> str:
        mover = Slow()
        c = Coordinator(spec(tmp_path), mover, Traffic())
        await c.load("a")
        reconciling = asyncio.create_task(c.reconcile())
        await mover.asked.wait()
        await c.unload("a")
        mover.answer.set()
        await reconciling
        return c.slots[c.by_name["a"].worker.name].state

    assert run(go()) == "unloaded"


def test_memory_the_gpu_reports_held_by_others_is_not_counted_free(tmp_path: Path) -> None:
    """NVML (through the agent) shows a process that is no worker holding memory: a load that fits by the plan
    but not beside it is refused, naming NVML as the source, and evicting nothing (it would not help)."""
    plan = spec(tmp_path, fits=1.1)

    async def go() -> tuple[Refused, list[tuple[str, str]]]:
        mover = Mover()
        mover.unmanaged = {GPU: 0.5 * plan.workers[0].footprint_gib}
        c = Coordinator(plan, mover, Traffic())
        await c.watch_gpus()  # what the upkeep does every few seconds
        with pytest.raises(Refused) as caught:
            await c.load("a")
        return caught.value, mover.calls

    refused, calls = run(go())
    assert calls == [] and refused.status == 503
    assert "as the GPU reports it (NVML" in refused.message and "MiB short" in refused.message, refused.message
