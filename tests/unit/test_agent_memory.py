"""A worker's GPU memory as NVML measures it (per process, the NVML double scripting it) against the plan's estimate:
the metrics, the warning in the agent's /status beyond a 10 % miss, and that warning in `controller status`."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.agent.memory import GIB, memory_warning
from controller.cli.status import agent_status
from controller.warnings import Facts, evaluate
from tests.stubs import free_port
from tests.unit.test_agent_residency import Setup, auth, call, made_setup

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    with made_setup(tmp_path) as made:
        yield made


def scrape(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def worker_status(client: Any, name: str) -> dict[str, Any]:
    return next(w for w in client.get("/status").json()["workers"] if w["name"] == name)


@pytest.mark.parametrize(
    ("ratio", "sign"),
    [(1.16, "+16 %"), (0.8, "-20 %"), (1.05, None), (0.93, None)],
    ids=["over", "under", "within-over", "within-under"],
)
def test_measured_memory_against_the_estimate(setup: Setup, ratio: float, sign: str | None) -> None:
    worker = setup.worker("steady")
    uuid = worker.gpus[0].uuid
    estimate = round(worker.footprint_gib * GIB)
    # Two processes of the worker on its GPU (an engine and its helper) share what it took; one of unknown memory.
    setup.own(worker, 4401, uuid, int(estimate * ratio) - GIB // 4)
    setup.own(worker, 4402, uuid, GIB // 4)
    setup.own(worker, 4403, uuid, None)
    measured = int(estimate * ratio)
    agent = setup.agent()
    agent.owners = setup.owners()
    with setup.client(agent) as client:
        samples = scrape(client.get("/metrics").text)
        status = worker_status(client, worker.name)
    labels = (("gpu", uuid), ("worker", worker.name))
    assert samples[("fleet_worker_memory_measured_bytes", labels)] == measured
    assert samples[("fleet_worker_memory_estimate_bytes", labels)] == estimate
    miss = samples[("fleet_worker_memory_estimate_miss_ratio", (("worker", worker.name),))]
    assert miss == pytest.approx(ratio - 1, abs=1e-6)
    assert status["memory"] == {
        "estimate_gib": round(estimate / GIB, 2),
        "measured_gib": {uuid: round(measured / GIB, 2)},
        "miss_ratio": round(miss, 4),
        "compared": True,
    }
    if sign is None:
        assert status["memory_warning"] is None
    else:
        assert status["memory_warning"] == (
            f"worker {worker.name} took {measured / GIB:.2f} GiB on {uuid}, "
            f"the estimate was {estimate / GIB:.2f} GiB ({sign})"
        )


def test_a_worker_on_two_gpus_is_judged_by_the_worst(setup: Setup) -> None:
    """Each GPU is measured on its own (the estimate is per GPU); the miss and the warning name the furthest one,
    here a GPU the worker was not planned on at all (also a wrong_gpu pinning)."""
    worker = setup.worker("steady")
    planned = worker.gpus[0].uuid
    other = next(g.uuid for g in setup.gpus if g.uuid != planned)
    estimate = round(worker.footprint_gib * GIB)
    setup.own(worker, 4501, planned, estimate)
    setup.own(worker, 4502, other, estimate // 2)
    agent = setup.agent()
    agent.owners = setup.owners()
    with setup.client(agent) as client:
        samples = scrape(client.get("/metrics").text)
        status = worker_status(client, worker.name)
    assert samples[("fleet_worker_memory_measured_bytes", (("gpu", planned), ("worker", worker.name)))] == estimate
    assert samples[("fleet_worker_memory_measured_bytes", (("gpu", other), ("worker", worker.name)))] == estimate // 2
    assert ("fleet_worker_memory_estimate_bytes", (("gpu", other), ("worker", worker.name))) not in samples
    assert samples[("fleet_worker_memory_estimate_miss_ratio", (("worker", worker.name),))] == pytest.approx(-0.5)
    assert status["memory_warning"] is not None and f"on {other}," in status["memory_warning"]
    assert status["memory_warning"].endswith("(-50 %)")


def test_no_process_is_no_measurement_and_no_warning(setup: Setup) -> None:
    worker = setup.worker("steady")
    with setup.client() as client:
        samples = scrape(client.get("/metrics").text)
        status = worker_status(client, worker.name)
    names = {name for name, labels in samples if ("worker", worker.name) in labels}
    assert "fleet_worker_memory_estimate_bytes" in names  # the plan's booking is a fact in any case
    assert "fleet_worker_memory_measured_bytes" not in names and "fleet_worker_memory_estimate_miss_ratio" not in names
    assert status["memory"]["measured_gib"] == {} and status["memory"]["miss_ratio"] is None
    assert status["memory_warning"] is None
    cpu = worker_status_of(setup, "fixed")
    assert cpu["memory"] is None and cpu["memory_warning"] is None  # a CPU worker books no GPU memory


def worker_status_of(setup: Setup, model: str) -> dict[str, Any]:
    with setup.client() as client:
        return worker_status(client, setup.worker(model).name)


def test_an_on_demand_worker_is_judged_after_a_load_until_its_unload(setup: Setup) -> None:
    """ "After a load" the measurement is compared. Before this agent loaded an on-demand worker, or once it unloaded
    it or put it to sleep, it may hold less than booked by design (a sleeping vLLM keeps its CUDA context): no miss.
    Here a llama.cpp worker whose process NVML shows throughout, at half its booking."""
    worker = setup.worker("od-llama")
    setup.container(worker, "running")
    setup.own(worker, 4601, worker.gpus[0].uuid, round(worker.footprint_gib * GIB / 2))
    agent = setup.agent()
    agent.owners = setup.owners()
    miss = ("fleet_worker_memory_estimate_miss_ratio", (("worker", worker.name),))
    measured = ("fleet_worker_memory_measured_bytes", (("gpu", worker.gpus[0].uuid), ("worker", worker.name)))
    with setup.client(agent) as client:
        before = worker_status(client, worker.name)
        assert before["memory_warning"] is None and before["memory"]["compared"] is False
        assert miss not in scrape(client.get("/metrics").text)

        loaded = call(client, "POST", worker.name, "load", headers=auth()).json()
        assert loaded["measured_gib"] == round(worker.footprint_gib / 2, 2)
        assert loaded["memory_warning"] is not None and loaded["memory_warning"].endswith("(-50 %)")
        samples = scrape(client.get("/metrics").text)
        assert samples[miss] == pytest.approx(-0.5) and measured in samples
        assert worker_status(client, worker.name)["memory_warning"] == loaded["memory_warning"]

        assert call(client, "POST", worker.name, "unload", headers=auth()).status_code == 200
        samples = scrape(client.get("/metrics").text)
        status = worker_status(client, worker.name)
    assert measured in samples and miss not in samples  # still measured, no longer judged
    assert status["memory_warning"] is None and status["memory"]["compared"] is False


def test_the_warning_text() -> None:
    gpu = "GPU-00000000-0000-4000-8000-0000000000b0"
    assert memory_warning("w", gpu, int(9.31 * GIB), int(8.02 * GIB)) == (
        f"worker w took 9.31 GiB on {gpu}, the estimate was 8.02 GiB (+16 %)"
    )
    assert memory_warning("w", gpu, int(8.82 * GIB), int(8.02 * GIB)) is None  # +10.0 %: not beyond
    assert memory_warning("w", gpu, GIB, 0) is None


@pytest.fixture
def agent_port(setup: Setup) -> Iterator[int]:
    """The agent's real /status, served on a port as the local stack's agent process serves it."""
    worker = setup.worker("steady")
    setup.own(worker, 4701, worker.gpus[0].uuid, int(worker.footprint_gib * 1.3 * GIB))
    agent = setup.agent()
    agent.owners = setup.owners()
    with setup.client(agent) as client:
        body = json.dumps(client.get("/status").json()).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/status" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield port
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_controller_status_shows_the_agents_warning(setup: Setup, agent_port: int) -> None:
    worker = setup.worker("steady")
    procs: dict[str, dict[str, Any]] = {
        "agent": {"kind": "agent", "state": "healthy", "ports": [agent_port]},
        "w": {"kind": "worker"},
    }
    doc = agent_status(procs)
    assert doc is not None
    found = [
        w for w in evaluate(setup.plan, Facts(agents={doc["host"]: doc})) if w.code == "FleetWorkerMemoryOffEstimate"
    ]
    assert [w.subject for w in found] == [{"worker": worker.name, "host": worker.host}]
    assert f"worker {worker.name} took " in found[0].message and found[0].message.endswith("(+30 %)")
    assert agent_status({"agent": {**procs["agent"], "state": "unhealthy"}}) is None  # not asked
    assert agent_status({"agent": {**procs["agent"], "ports": [free_port()]}}) is None  # no answer: nothing to say
