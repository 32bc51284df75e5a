"""The host agent: GPU metrics and /status from NVML, GPU processes mapped to workers, pinning states.

NVML is the real one when `pynvml.nvmlInit()` works here (a GPU host), else
the double in tests/doubles/nvml.py; the session prints which. Tests that
check facts true of any GPU run on both; tests that script specific NVML
values (throttle bits, ECC counts, processes on a chosen GPU) run on the
double only and say so when skipped on real hardware.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from controller.agent import nvml as seam
from controller.agent.nvml import Nvml, NvmlReader, Pynvml
from controller.agent.service import (
    Agent,
    ProcessOwners,
    ProcFs,
    build_agent,
    create_app,
    main,
)
from controller.local.state import StateDir, start_time
from controller.plan import Plan, make_plan
from controller.plan.models import Worker
from controller.spec import load_spec
from tests.doubles.nvml import GIB, FakeGpu, FakeNvml, real_nvml_problem
from tests.helpers import write_spec
from tests.llama import running_llama_server, tiny_command, tiny_model
from tests.stubs import free_port_run

HOST = "gpuhost"
UUID0 = "GPU-00000000-0000-4000-8000-0000000000a0"
UUID1 = "GPU-00000000-0000-4000-8000-0000000000a1"
DOUBLE_ONLY = "scripts specific NVML values: runs on the NVML double only (real NVML is present here)"
GPU_FAMILIES = {
    "fleet_gpu_utilization_ratio",
    "fleet_gpu_memory_used_bytes",
    "fleet_gpu_memory_total_bytes",
    "fleet_gpu_power_watts",
    "fleet_gpu_power_limit_watts",
    "fleet_gpu_temperature_celsius",
    "fleet_gpu_sm_clock_hertz",
    "fleet_gpu_memory_clock_hertz",
    "fleet_gpu_throttle_active",
    "fleet_gpu_ecc_errors_total",
    "fleet_gpu_process_memory_bytes",
    "fleet_gpu_unmanaged_processes",
}


# -- which NVML: the real one where a GPU answers, else the double ---------------


@pytest.fixture(scope="session")
def real_nvml(request: pytest.FixtureRequest) -> bool:
    problem = real_nvml_problem()
    which = "real NVML (pynvml)" if problem is None else f"the NVML double (real NVML: {problem})"
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nagent tests run against {which}")
    return problem is None


@dataclass
class Side:
    nvml: Nvml
    real: bool
    fakes: list[FakeGpu]

    @property
    def fake(self) -> FakeNvml:
        if self.real:
            pytest.skip(DOUBLE_ONLY)
        assert isinstance(self.nvml, FakeNvml)
        return self.nvml


def default_gpus() -> list[FakeGpu]:
    return [
        FakeGpu(uuid=UUID0, name="NVIDIA GeForce RTX 4090"),
        FakeGpu(uuid=UUID1, name="NVIDIA GeForce RTX 3090", power_limit_mw=350_000),
    ]


@pytest.fixture
def side(real_nvml: bool) -> Side:
    if real_nvml:
        return Side(Pynvml(), True, [])
    fakes = default_gpus()
    return Side(FakeNvml(fakes), False, fakes)


def gpus_seen(nvml: Nvml) -> list[dict[str, Any]]:
    """The GPUs NVML shows, as spec entries, so the spec fits real hardware as well as the double."""
    nvml.init()
    try:
        out = []
        for index in range(nvml.device_count()):
            handle = nvml.handle_by_index(index)
            total = nvml.memory_info(handle).total
            out.append({"uuid": nvml.uuid(handle), "name": nvml.name(handle), "vram_gib": round(total / GIB, 2)})
        return out
    finally:
        nvml.shutdown()


def fleet(gpus: list[dict[str, Any]], port_base: int) -> dict[str, Any]:
    return {
        "version": 1,
        "name": "agent-test",
        "mesh": {"kind": "none"},
        "hosts": [
            {"name": HOST, "address": "127.0.0.1", "gpus": gpus, "cpu_workers": 1, "worker_port_base": port_base}
        ],
        "models": [
            {
                "name": "small",
                "backend": "vllm",
                "source": {"huggingface": "org/small"},
                "arch": {"layers": 2, "kv_heads": 1, "head_dim": 64, "params_b": 0.1},
                "context": 2048,
                "parallel": 1,
            },
            {
                "name": "tiny",
                "backend": "llamacpp",
                "device": "cpu",
                "source": {"gguf": "/m/t.gguf"},
                "context": 512,
                "arch": {"layers": 2, "kv_heads": 2, "head_dim": 16, "params_b": 0.001},
            },
        ],
        "gateway": {"host": HOST, "public_name": "localhost", "tls": {"mode": "internal"}, "ports": {"https": 8443}},
        "users": [{"name": "me", "models": ["*"]}],
    }


@dataclass
class Setup:
    side: Side
    spec: Path
    plan: Plan
    state: Path

    @property
    def gpu_worker(self) -> Worker:
        return next(w for w in self.plan.workers if w.gpus)

    @property
    def cpu_worker(self) -> Worker:
        return next(w for w in self.plan.workers if not w.gpus)

    def fake_gpu(self, uuid: str) -> FakeGpu:
        return next(g for g in self.side.fakes if g.uuid == uuid)

    def other_gpu(self, worker: Worker) -> FakeGpu:
        planned = {g.uuid for g in worker.gpus}
        return next(g for g in self.side.fakes if g.uuid not in planned)

    def agent(self, **options: Any) -> Agent:
        options.setdefault("max_age_s", 0.0)
        return build_agent(self.spec, HOST, self.state, nvml=self.side.nvml, container_names=lambda _: None, **options)

    def client(self, **options: Any) -> TestClient:
        return TestClient(create_app(self.agent(**options)))

    def own(self, worker: Worker, pid: int) -> None:
        """Record ``pid`` as ``worker``'s process in the local stack's process table, as the supervisor does."""
        StateDir(self.state).write_json(
            self.state / "state.json",
            {"processes": {worker.name: {"kind": "worker", "pid": pid, "started": start_time(pid)}}},
        )


@pytest.fixture
def setup(side: Side, tmp_path: Path) -> Setup:
    spec = write_spec(tmp_path / "fleet.yaml", fleet(gpus_seen(side.nvml), free_port_run(4)))
    state = tmp_path / "state"
    state.mkdir()
    return Setup(side, spec, make_plan(load_spec(spec)), state)


# -- reading metrics --------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def scrape(client: TestClient) -> list[Sample]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return [
        Sample(s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    ]


def pick(samples: list[Sample], metric: str, /, **labels: str) -> list[Sample]:
    return [s for s in samples if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())]


def one(samples: list[Sample], metric: str, /, **labels: str) -> float:
    found = pick(samples, metric, **labels)
    assert len(found) == 1, f"{metric} {labels}: {found}"
    return found[0].value


def pinning_of(samples: list[Sample], worker: str) -> dict[str, float]:
    return {s.labels["state"]: s.value for s in pick(samples, "fleet_worker_pinning", worker=worker)}


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session's group: children and orphans too
        proc.wait()


def spawn(procs: list[subprocess.Popen[bytes]], script: str) -> int:
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)  # a worker: its own session
    procs.append(proc)
    return proc.pid


def wait_for(find: Callable[[], int | bool], what: str) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = find()
        if found:
            return int(found)
        time.sleep(0.02)
    raise AssertionError(f"no {what}")


def reparented(session: int) -> int:
    """A process of ``session`` whose parent is outside it (its own parent exited), or 0."""
    members = session_members(session)
    inside = {pid for pid, _ in members}
    return next((pid for pid, parent in members if parent not in inside and pid != session), 0)


def session_members(session: int) -> list[tuple[int, int]]:
    """(pid, parent pid) of every process in ``session``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = ProcFs().stat(int(entry.name))
            if stat is not None and stat.session == session:
                out.append((int(entry.name), stat.ppid))
    return out


# -- on real NVML and on the double -----------------------------------------------


def test_gpu_metrics_cover_every_gpu_with_its_labels(setup: Setup) -> None:
    seen = gpus_seen(setup.side.nvml)
    with setup.client() as client:
        samples = scrape(client)
    assert one(samples, "fleet_agent_nvml_up", host=HOST) == 1
    for index, gpu in enumerate(seen):
        labels = {"host": HOST, "uuid": gpu["uuid"], "index": str(index), "name": gpu["name"]}
        total = one(samples, "fleet_gpu_memory_total_bytes", **labels)
        assert total == pytest.approx(gpu["vram_gib"] * GIB, rel=0.01)
        if pick(samples, "fleet_gpu_memory_used_bytes", **labels):
            assert 0 <= one(samples, "fleet_gpu_memory_used_bytes", **labels) <= total
        if pick(samples, "fleet_gpu_utilization_ratio", **labels):
            assert 0 <= one(samples, "fleet_gpu_utilization_ratio", **labels) <= 1
        if pick(samples, "fleet_gpu_temperature_celsius", **labels):
            assert 0 < one(samples, "fleet_gpu_temperature_celsius", **labels) < 130
        for clock in ("fleet_gpu_sm_clock_hertz", "fleet_gpu_memory_clock_hertz"):
            for sample in pick(samples, clock, **labels):
                assert sample.value >= 0 and sample.value % 1e6 == 0  # NVML reports whole MHz
        for sample in pick(samples, "fleet_gpu_power_watts", **labels):
            assert 0 < sample.value < 2000
        throttle = pick(samples, "fleet_gpu_throttle_active", **labels)
        assert {s.labels["reason"] for s in throttle} <= {"thermal", "power_cap", "hw_slowdown"}
        assert all(s.value in (0, 1) for s in throttle)
        ecc = pick(samples, "fleet_gpu_ecc_errors_total", **labels)
        assert {s.labels["type"] for s in ecc} in (set(), {"corrected", "uncorrected"})
    assert {s.labels["uuid"] for s in samples if s.name.startswith("fleet_gpu_")} == {g["uuid"] for g in seen}
    for sample in samples:
        if sample.name.startswith("fleet_gpu_") and sample.name != "fleet_gpu_process_memory_bytes":
            assert {"host", "uuid", "index", "name"} <= set(sample.labels)


def test_status_and_metrics_tell_the_same_story(setup: Setup) -> None:
    with setup.client(max_age_s=60) as client:  # one snapshot serves both
        status = client.get("/status").json()
        samples = scrape(client)
    assert status["host"] == HOST and status["nvml"] == {"up": True, "reason": None, "errors": []}
    assert [g["uuid"] for g in status["gpus"]] == [g["uuid"] for g in gpus_seen(setup.side.nvml)]
    assert status["missing_gpus"] == []
    for gpu in status["gpus"]:
        unowned = [p for p in gpu["processes"] if p["worker"] is None]
        assert gpu["unmanaged_processes"] == len(unowned)
        assert one(samples, "fleet_gpu_unmanaged_processes", uuid=gpu["uuid"]) == len(unowned)
        assert one(samples, "fleet_gpu_memory_total_bytes", uuid=gpu["uuid"]) == gpu["memory_total_bytes"]
        for proc in gpu["processes"]:
            if proc["memory_bytes"] is not None:
                value = one(samples, "fleet_gpu_process_memory_bytes", uuid=gpu["uuid"], pid=str(proc["pid"]))
                assert value == proc["memory_bytes"]
    assert {w["name"] for w in status["workers"]} == {w.name for w in setup.plan.workers}
    assert len(status["unmanaged"]) == sum(g["unmanaged_processes"] for g in status["gpus"])


def test_a_planned_worker_with_no_gpu_process_is_not_found(setup: Setup) -> None:
    gpu, cpu = setup.gpu_worker, setup.cpu_worker  # neither runs: nothing is listening on their ports
    with setup.client() as client:
        status = {w["name"]: w for w in client.get("/status").json()["workers"]}
        samples = scrape(client)
    assert status[gpu.name]["pinning"] == "not_found"
    assert pinning_of(samples, gpu.name) == {"ok": 0, "wrong_gpu": 0, "not_found": 1}
    assert status[cpu.name]["pinning"] == "ok"  # a CPU worker with no GPU process is where it belongs
    assert pinning_of(samples, cpu.name) == {"ok": 1, "wrong_gpu": 0, "not_found": 0}
    for worker in (gpu, cpu):
        assert one(samples, "fleet_worker_up", worker=worker.name, model=worker.model) == 0
        assert not pick(samples, "fleet_worker_health_latency_seconds", worker=worker.name)
        assert status[worker.name]["health"]["up"] is False and status[worker.name]["health"]["error"]


# -- on the double: scripted values -----------------------------------------------


def test_values_are_converted_from_nvml_units(setup: Setup) -> None:
    fake = setup.side.fake
    gpu = fake.gpus[0]
    gpu.utilization, gpu.memory_used, gpu.memory_total = 37, 3 * GIB, 24 * GIB
    gpu.power_usage_mw, gpu.power_limit_mw, gpu.temperature_c = 312_500, 450_000, 71
    gpu.sm_clock_mhz, gpu.memory_clock_mhz = 2520, 10501
    with setup.client() as client:
        samples = scrape(client)
        status = client.get("/status").json()["gpus"][0]
    labels = {"host": HOST, "uuid": UUID0, "index": "0", "name": "NVIDIA GeForce RTX 4090"}
    assert one(samples, "fleet_gpu_utilization_ratio", **labels) == pytest.approx(0.37)
    assert one(samples, "fleet_gpu_memory_used_bytes", **labels) == 3 * GIB
    assert one(samples, "fleet_gpu_memory_total_bytes", **labels) == 24 * GIB
    assert one(samples, "fleet_gpu_power_watts", **labels) == pytest.approx(312.5)
    assert one(samples, "fleet_gpu_power_limit_watts", **labels) == 450
    assert one(samples, "fleet_gpu_temperature_celsius", **labels) == 71
    assert one(samples, "fleet_gpu_sm_clock_hertz", **labels) == 2520e6
    assert one(samples, "fleet_gpu_memory_clock_hertz", **labels) == 10501e6
    assert status["power_watts"] == pytest.approx(312.5) and status["utilization_ratio"] == pytest.approx(0.37)
    assert status["throttle"] == {"thermal": False, "power_cap": False, "hw_slowdown": False}
    assert one(samples, "fleet_gpu_power_limit_watts", uuid=UUID1) == 350


@pytest.mark.parametrize(
    ("bits", "active"),
    [
        (pynvml.nvmlClocksEventReasonGpuIdle | pynvml.nvmlClocksEventReasonApplicationsClocksSetting, set()),
        (pynvml.nvmlClocksEventReasonSwThermalSlowdown, {"thermal"}),
        (pynvml.nvmlClocksEventReasonHwThermalSlowdown, {"thermal"}),
        (pynvml.nvmlClocksEventReasonSwPowerCap, {"power_cap"}),
        (pynvml.nvmlClocksEventReasonHwSlowdown, {"hw_slowdown"}),
        (pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown, {"hw_slowdown"}),
        (
            pynvml.nvmlClocksEventReasonSwPowerCap | pynvml.nvmlClocksEventReasonHwThermalSlowdown,
            {"power_cap", "thermal"},
        ),
        (pynvml.nvmlClocksEventReasonSyncBoost | pynvml.nvmlClocksEventReasonDisplayClockSetting, set()),
    ],
)
def test_throttle_bits_map_to_reasons(setup: Setup, bits: int, active: set[str]) -> None:
    setup.side.fake.gpus[0].clocks_event_reasons = bits
    with setup.client() as client:
        samples = scrape(client)
    reasons = {s.labels["reason"]: s.value for s in pick(samples, "fleet_gpu_throttle_active", uuid=UUID0)}
    assert reasons == {r: float(r in active) for r in ("thermal", "power_cap", "hw_slowdown")}


def test_a_reason_the_gpu_cannot_report_is_absent(setup: Setup) -> None:
    gpu = setup.side.fake.gpus[0]
    gpu.supported_reasons = pynvml.nvmlClocksEventReasonAll & ~(
        pynvml.nvmlClocksEventReasonHwSlowdown | pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown
    )
    gpu.clocks_event_reasons = pynvml.nvmlClocksEventReasonSwThermalSlowdown
    with setup.client() as client:
        samples = scrape(client)
    reasons = {s.labels["reason"]: s.value for s in pick(samples, "fleet_gpu_throttle_active", uuid=UUID0)}
    assert reasons == {"thermal": 1, "power_cap": 0}


def test_ecc_counts_only_where_supported_and_on(setup: Setup) -> None:
    fake = setup.side.fake
    fake.gpus[0].ecc = (12, 1)
    fake.gpus[1].ecc = None  # a GeForce card: NVML_ERROR_NOT_SUPPORTED
    with setup.client() as client:
        samples = scrape(client)
        status = client.get("/status").json()["gpus"]
        assert one(samples, "fleet_gpu_ecc_errors_total", uuid=UUID0, type="corrected") == 12
        assert one(samples, "fleet_gpu_ecc_errors_total", uuid=UUID0, type="uncorrected") == 1
        assert not pick(samples, "fleet_gpu_ecc_errors_total", uuid=UUID1)
        assert status[0]["ecc_errors"] == {"corrected": 12, "uncorrected": 1} and status[1]["ecc_errors"] is None
        assert "ecc_errors" in status[1]["unsupported"] and not status[1]["errors"]
        fake.gpus[0].ecc_enabled = False  # counters of a GPU with ECC off mean nothing
        assert not pick(scrape(client), "fleet_gpu_ecc_errors_total")


def test_an_unsupported_reading_is_absent_not_zero(setup: Setup) -> None:
    setup.side.fake.gpus[0].unsupported = {"power_usage", "temperature"}
    with setup.client() as client:
        samples = scrape(client)
        status = client.get("/status").json()["gpus"][0]
    assert not pick(samples, "fleet_gpu_power_watts", uuid=UUID0)
    assert not pick(samples, "fleet_gpu_temperature_celsius", uuid=UUID0)
    assert pick(samples, "fleet_gpu_power_watts", uuid=UUID1) and pick(
        samples, "fleet_gpu_power_limit_watts", uuid=UUID0
    )
    assert status["power_watts"] is None and {"power", "temperature"} <= set(status["unsupported"])
    assert "power_limit" not in status["unsupported"] and not status["errors"]


def test_worker_process_on_its_gpu_is_ok(setup: Setup, procs: list[subprocess.Popen[bytes]]) -> None:
    setup.side.fake  # noqa: B018 (skips on real NVML)
    worker = setup.gpu_worker
    pid = spawn(procs, "exec sleep 60")
    setup.own(worker, pid)
    setup.fake_gpu(worker.gpus[0].uuid).processes = [(pid, 6 * GIB)]
    with setup.client() as client:
        samples = scrape(client)
        status = {w["name"]: w for w in client.get("/status").json()["workers"]}
    assert pinning_of(samples, worker.name) == {"ok": 1, "wrong_gpu": 0, "not_found": 0}
    assert status[worker.name]["processes"] == [{"uuid": worker.gpus[0].uuid, "pid": pid, "memory_bytes": 6 * GIB}]
    sample = pick(samples, "fleet_gpu_process_memory_bytes", pid=str(pid))
    assert [(s.labels, s.value) for s in sample] == [
        ({"uuid": worker.gpus[0].uuid, "pid": str(pid), "worker": worker.name}, 6 * GIB)
    ]
    assert one(samples, "fleet_gpu_unmanaged_processes", uuid=worker.gpus[0].uuid) == 0


def test_worker_process_on_another_gpu_is_wrong_gpu(setup: Setup, procs: list[subprocess.Popen[bytes]]) -> None:
    setup.side.fake  # noqa: B018 (skips on real NVML)
    worker = setup.gpu_worker
    pid = spawn(procs, "exec sleep 60")
    setup.own(worker, pid)
    wrong = setup.other_gpu(worker)
    wrong.processes = [(pid, 6 * GIB)]
    with setup.client() as client:
        samples = scrape(client)
        status = {w["name"]: w for w in client.get("/status").json()["workers"]}
    assert pinning_of(samples, worker.name) == {"ok": 0, "wrong_gpu": 1, "not_found": 0}
    assert status[worker.name]["pinning"] == "wrong_gpu" and wrong.uuid in status[worker.name]["pinning_reason"]
    assert one(samples, "fleet_gpu_unmanaged_processes", uuid=wrong.uuid) == 0  # owned, just misplaced


def test_a_cpu_worker_on_a_gpu_is_wrong_gpu(setup: Setup, procs: list[subprocess.Popen[bytes]]) -> None:
    setup.side.fake  # noqa: B018 (skips on real NVML)
    worker = setup.cpu_worker
    pid = spawn(procs, "exec sleep 60")
    setup.own(worker, pid)
    setup.side.fakes[0].processes = [(pid, GIB)]
    with setup.client() as client:
        assert pinning_of(scrape(client), worker.name) == {"ok": 0, "wrong_gpu": 1, "not_found": 0}


def test_children_and_orphans_of_a_worker_belong_to_it(setup: Setup, procs: list[subprocess.Popen[bytes]]) -> None:
    setup.side.fake  # noqa: B018 (skips on real NVML)
    worker = setup.gpu_worker
    # A launcher whose engine runs in a child, and a grandchild whose parent exited (reparented, same session).
    root = spawn(procs, "sleep 60 & (sleep 61 &) ; wait")
    child = wait_for(lambda: next((p for p, parent in session_members(root) if parent == root), 0), "child")
    orphan = wait_for(lambda: reparented(root), "reparented grandchild")
    setup.own(worker, root)
    uuid = worker.gpus[0].uuid
    setup.fake_gpu(uuid).processes = [(child, GIB), (orphan, None)]
    with setup.client() as client:
        samples = scrape(client)
        gpu = next(g for g in client.get("/status").json()["gpus"] if g["uuid"] == uuid)
    assert {p["pid"]: p["worker"] for p in gpu["processes"]} == {child: worker.name, orphan: worker.name}
    assert pinning_of(samples, worker.name)["ok"] == 1
    assert one(samples, "fleet_gpu_unmanaged_processes", uuid=uuid) == 0
    assert not pick(samples, "fleet_gpu_process_memory_bytes", pid=str(orphan))  # NVML could not tell its memory


def test_a_process_no_worker_owns_is_unmanaged(setup: Setup, procs: list[subprocess.Popen[bytes]]) -> None:
    setup.side.fake  # noqa: B018 (skips on real NVML)
    worker = setup.gpu_worker
    stranger = os.getpid()  # alive, but no worker's
    stale = spawn(procs, "exec sleep 60")
    setup.own(worker, stale)
    table = StateDir(setup.state).read_json(setup.state / "state.json") or {}
    table["processes"][worker.name]["started"] += 1  # the recorded process is gone; its PID was reused
    StateDir(setup.state).write_json(setup.state / "state.json", table)
    uuid = worker.gpus[0].uuid
    setup.fake_gpu(uuid).processes = [(stranger, 2 * GIB), (stale, GIB)]
    with setup.client() as client:
        samples = scrape(client)
        status = client.get("/status").json()
    assert one(samples, "fleet_gpu_unmanaged_processes", uuid=uuid) == 2
    assert one(samples, "fleet_gpu_process_memory_bytes", uuid=uuid, pid=str(stranger), worker="") == 2 * GIB
    assert {p["pid"] for p in status["unmanaged"]} == {stranger, stale}
    assert pinning_of(samples, worker.name)["not_found"] == 1


def test_container_processes_are_matched_by_cgroup(setup: Setup, tmp_path: Path) -> None:
    fake = setup.side.fake
    gpu_worker, cpu_worker = setup.gpu_worker, setup.cpu_worker
    cid = "3f" * 32
    cgroups = {
        4101: f"0::/system.slice/docker-{cid}.scope\n",  # Docker, cgroup v2: the id names the container
        4102: f"0::/system.slice/fleet-{cpu_worker.name}.service/libpod-payload-{'ab' * 32}\n",  # Quadlet
        4103: f"12:memory:/docker/{'cd' * 32}\n0::/\n",  # some other container
        4104: "0::/user.slice/user-1000.slice/session-2.scope\n",  # a desktop process
    }
    for pid, text in cgroups.items():
        (tmp_path / "proc" / str(pid)).mkdir(parents=True)
        (tmp_path / "proc" / str(pid) / "cgroup").write_text(text)
    names = {cid: f"fleet-{gpu_worker.name}", "cd" * 32: "fleet-someone-else"}
    other = setup.other_gpu(gpu_worker)
    other.processes = [(4101, GIB), (4102, GIB), (4103, GIB), (4104, GIB)]
    plan_workers = setup.plan.workers_on(HOST)
    owners = ProcessOwners([w.name for w in plan_workers], None, names.get, ProcFs(tmp_path / "proc"))
    agent = Agent(setup.plan.host(HOST), plan_workers, NvmlReader(fake), owners, max_age_s=0)
    with TestClient(create_app(agent)) as client:
        samples = scrape(client)
    assert pinning_of(samples, gpu_worker.name)["wrong_gpu"] == 1
    assert pinning_of(samples, cpu_worker.name)["wrong_gpu"] == 1
    assert one(samples, "fleet_gpu_unmanaged_processes", uuid=other.uuid) == 2


def test_without_nvml_gpu_metrics_are_absent_and_status_says_why(setup: Setup) -> None:
    setup.side.fake.init_error = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    with setup.client() as client:
        samples = scrape(client)
        status = client.get("/status").json()
    assert not [s for s in samples if s.name in GPU_FAMILIES]
    assert one(samples, "fleet_agent_nvml_up", host=HOST) == 0
    assert status["nvml"]["up"] is False
    assert status["nvml"]["reason"] == "NVML init failed: NVML Shared Library Not Found"
    assert status["gpus"] == [] and status["missing_gpus"] == []
    workers = {w["name"]: w for w in status["workers"]}
    gpu, cpu = setup.gpu_worker.name, setup.cpu_worker.name
    assert workers[gpu]["pinning"] == "unknown" and "NVML down" in workers[gpu]["pinning_reason"]
    assert not pinning_of(samples, gpu)  # no facts, no numbers
    assert workers[cpu]["pinning"] == "ok" and pinning_of(samples, cpu)["ok"] == 1
    assert pick(samples, "fleet_worker_up", worker=gpu)  # health does not need NVML


def test_nvml_coming_back_is_picked_up(setup: Setup) -> None:
    fake = setup.side.fake
    fake.init_error = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    with setup.client() as client:
        assert client.get("/status").json()["nvml"]["reason"] == "NVML init failed: Driver Not Loaded"
        fake.init_error = None
        assert client.get("/status").json()["nvml"]["up"] is True


def test_real_nvml_without_a_gpu_reports_down(setup: Setup) -> None:
    if setup.side.real:
        pytest.skip("needs a machine where NVML cannot start (real NVML is present here)")
    setup.side = Side(Pynvml(), False, [])
    with setup.client() as client:
        status = client.get("/status").json()
        samples = scrape(client)
    assert status["nvml"]["up"] is False and status["nvml"]["reason"].startswith("NVML init failed: ")
    assert not [s for s in samples if s.name in GPU_FAMILIES]


def test_missing_nvidia_ml_py_reports_down(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    setup.side = Side(Pynvml(), False, [])
    with setup.client() as client:
        status = client.get("/status").json()
    assert status["nvml"]["up"] is False and "nvidia-ml-py is not installed" in status["nvml"]["reason"]


def test_a_hung_nvml_call_is_bounded(setup: Setup) -> None:
    fake = setup.side.fake
    fake.stall = threading.Event()
    with setup.client() as client:
        reader: NvmlReader = client.app.state.agent.reader  # type: ignore[attr-defined]
        reader.timeout_s = 0.2
        began = time.monotonic()
        first = client.get("/status").json()["nvml"]
        assert time.monotonic() - began < 2
        assert first == {"up": False, "reason": "NVML did not answer within 0.2 s", "errors": []}
        assert "has not returned" in client.get("/status").json()["nvml"]["reason"]  # no second call piles up
        fake.stall.set()
        wait_for(lambda: not reader._stuck or not reader._stuck.is_alive(), "the stuck call to return")
        assert client.get("/status").json()["nvml"]["up"] is True


def test_a_lost_gpu_is_reported_and_pinning_is_unknown(setup: Setup) -> None:
    fake = setup.side.fake
    worker = setup.gpu_worker
    lost = setup.fake_gpu(worker.gpus[0].uuid)
    lost.lost = True
    with setup.client() as client:
        samples = scrape(client)
        status = client.get("/status").json()
    index = fake.gpus.index(lost)
    assert status["nvml"]["up"] is True and status["nvml"]["errors"] == [f"GPU {index}: GPU is lost"]
    assert lost.uuid not in {g["uuid"] for g in status["gpus"]}
    assert not pick(samples, "fleet_gpu_memory_total_bytes", uuid=lost.uuid)
    assert pick(samples, "fleet_gpu_memory_total_bytes", uuid=setup.other_gpu(worker).uuid)
    assert {w["name"]: w["pinning"] for w in status["workers"]}[worker.name] == "unknown"


def test_a_planned_gpu_nvml_does_not_show_is_missing(setup: Setup) -> None:
    fake = setup.side.fake
    gone = fake.gpus.pop()
    with setup.client() as client:
        assert client.get("/status").json()["missing_gpus"] == [gone.uuid]


def test_worker_health_up_latency_and_timeout(setup: Setup, tmp_path: Path) -> None:
    gpu, cpu = setup.gpu_worker, setup.cpu_worker
    argv, env = tiny_command(tiny_model(tmp_path), cpu.port)  # the llama.cpp worker, for real: GET /health is 200
    silent = socket.socket()  # accepts connections (backlog) and never answers
    silent.bind(("127.0.0.1", gpu.port))
    silent.listen(8)
    try:
        with (
            running_llama_server(argv, env, cpu.port, tmp_path / "llama-server.log"),
            setup.client(health_timeout_s=0.3) as client,
        ):
            began = time.monotonic()
            samples = scrape(client)
            assert time.monotonic() - began < 3
            status = {w["name"]: w["health"] for w in client.get("/status").json()["workers"]}
    finally:
        silent.close()
    assert one(samples, "fleet_worker_up", worker=cpu.name, model="tiny") == 1
    assert 0 < one(samples, "fleet_worker_health_latency_seconds", worker=cpu.name) < 1
    assert status[cpu.name] == {
        "url": f"http://127.0.0.1:{cpu.port}/health",
        "up": True,
        "latency_seconds": status[cpu.name]["latency_seconds"],
        "error": None,
    }
    assert one(samples, "fleet_worker_up", worker=gpu.name, model="small") == 0
    assert status[gpu.name]["up"] is False and "Timeout" in status[gpu.name]["error"]


def test_healthz(setup: Setup) -> None:
    with setup.client() as client:
        assert client.get("/healthz").json() == {"ok": True}


# -- pieces -----------------------------------------------------------------------


def test_seam_constants_are_nvmls() -> None:
    assert seam.NVML_ERROR_UNINITIALIZED == pynvml.NVML_ERROR_UNINITIALIZED
    assert seam.NVML_ERROR_NOT_SUPPORTED == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert seam.NVML_ERROR_DRIVER_NOT_LOADED == pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    assert seam.NVML_ERROR_LIBRARY_NOT_FOUND == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    assert seam.NVML_ERROR_FUNCTION_NOT_FOUND == pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    assert seam.NVML_ERROR_GPU_IS_LOST == pynvml.NVML_ERROR_GPU_IS_LOST
    assert seam.NVML_ERROR_INVALID_ARGUMENT == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert seam.NVML_ERROR_NOT_FOUND == pynvml.NVML_ERROR_NOT_FOUND
    assert seam.NVML_TEMPERATURE_GPU == pynvml.NVML_TEMPERATURE_GPU
    assert (seam.NVML_CLOCK_SM, seam.NVML_CLOCK_MEM) == (pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_MEM)
    assert seam.NVML_MEMORY_ERROR_TYPE_CORRECTED == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
    assert seam.NVML_MEMORY_ERROR_TYPE_UNCORRECTED == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    assert seam.NVML_VOLATILE_ECC == pynvml.NVML_VOLATILE_ECC
    assert seam.NVML_FEATURE_ENABLED == pynvml.NVML_FEATURE_ENABLED
    assert {
        "thermal": pynvml.nvmlClocksEventReasonSwThermalSlowdown | pynvml.nvmlClocksEventReasonHwThermalSlowdown,
        "power_cap": pynvml.nvmlClocksEventReasonSwPowerCap,
        "hw_slowdown": pynvml.nvmlClocksEventReasonHwSlowdown | pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown,
    } == seam.THROTTLE_REASONS


def test_the_double_follows_nvml_call_rules() -> None:
    fake = FakeNvml(default_gpus())
    with pytest.raises(seam.NvmlError) as info:
        fake.device_count()
    assert info.value.code == pynvml.NVML_ERROR_UNINITIALIZED and str(info.value) == "Uninitialized"
    fake.init()
    with pytest.raises(seam.NvmlError) as info:
        fake.handle_by_index(2)
    assert info.value.code == pynvml.NVML_ERROR_INVALID_ARGUMENT
    handle = fake.handle_by_index(0)
    memory = fake.memory_info(handle)
    assert memory.free == memory.total - memory.used
    with pytest.raises(seam.NvmlError) as info:
        fake.ecc_mode(handle)
    assert info.value.not_supported
    fake.shutdown()
    with pytest.raises(seam.NvmlError):
        fake.uuid(handle)


def test_cli_refuses_an_unknown_host(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--spec", str(setup.spec), "--host-name", "nope"])
    assert info.value.code == 2
    assert f"no host 'nope'; hosts: {HOST}" in capsys.readouterr().err


def test_the_local_stack_runs_the_agent(tmp_path: Path) -> None:
    from controller.local.demo import DemoPorts, write_demo
    from controller.local.processes import local_processes

    state = StateDir(tmp_path / "state")
    spec = write_demo(state, DemoPorts(agent=18999))
    (agent,) = [p for p in local_processes(make_plan(load_spec(spec)), spec, state) if p.name == "agent"]
    assert agent.kind == "agent" and agent.ports == [18999]
    assert agent.health_url == "http://127.0.0.1:18999/healthz"
    assert agent.argv[1:] == [
        "-m",
        "controller.agent.service",
        "--spec",
        str(spec.resolve()),
        "--host-name",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        "18999",
        "--state-dir",
        str(state.root),
    ]
