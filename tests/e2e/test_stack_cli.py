"""Operating the local stack as a user would: status, idempotent up, restart, logs, re-adoption, down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.stack import Stack, pid_alive
from tests.stubs import wait_until

pytestmark = pytest.mark.e2e


def test_status_shows_every_worker(stack: Stack) -> None:
    info = stack.status()
    assert info["running"] and info["base_url"] == stack.base_url and info["ca_cert"] == str(stack.ca)
    workers = stack.workers()
    assert sorted(workers) == ["tiny-chat-local-cpu-1", "tiny-chat-local-cpu-2", "tiny-embed-local-cpu-1"]
    for row in workers.values():
        assert row["state"] == "healthy" and row["health"] == "healthy" and pid_alive(row["pid"])
        assert row["gpus"] == []  # CPU workers: CUDA_VISIBLE_DEVICES is empty
    human = stack.ctl("status")
    assert human.returncode == 0 and "tiny-chat-local-cpu-1" in human.stdout and "healthy" in human.stdout


def test_workers_are_pinned_by_cuda_visible_devices(stack: Stack) -> None:
    for row in stack.workers().values():
        environ = Path(f"/proc/{row['pid']}/environ").read_bytes().split(b"\0")
        assert b"CUDA_VISIBLE_DEVICES=" in environ  # set, and empty: no GPU for a CPU worker


def test_up_is_idempotent(stack: Stack) -> None:
    before = {n: p["pid"] for n, p in stack.processes().items()}
    result = stack.ctl("up", str(stack.spec), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["already_running"] is True
    assert {n: p["pid"] for n, p in stack.processes().items()} == before


def test_up_with_another_spec_refuses(stack: Stack, tmp_path: object) -> None:
    other = stack.state.root / "other.yaml"
    other.write_text(stack.spec.read_text().replace("name: demo", "name: other", 1))
    result = stack.ctl("up", str(other))
    assert result.returncode != 0 and "controller down" in result.stderr and "Traceback" not in result.stderr


def test_restart_and_logs(stack: Stack) -> None:
    name = "tiny-embed-local-cpu-1"
    old = stack.workers()[name]["pid"]
    result = stack.ctl("restart", name)
    assert result.returncode == 0 and "restarted" in result.stdout
    procs = stack.wait_healthy(timeout=30)
    assert procs[name]["pid"] != old and not pid_alive(old)
    logs = stack.ctl("logs", name, "-n", "200")
    assert logs.returncode == 0 and logs.stdout.count(f"starting {name}") >= 2
    unknown = stack.ctl("restart", "nope")
    assert unknown.returncode != 0 and "no process 'nope'" in unknown.stderr


def test_killed_worker_restarts_within_seconds(stack: Stack) -> None:
    name = "tiny-chat-local-cpu-2"
    old = stack.workers()[name]["pid"]
    os.kill(old, signal.SIGKILL)
    began = time.monotonic()
    wait_until(
        lambda: stack.workers()[name]["state"] == "healthy" and stack.workers()[name]["pid"] != old, 10, "restart"
    )
    assert time.monotonic() - began < 10


def test_new_supervisor_adopts_running_processes(stack: Stack) -> None:
    before = {n: p["pid"] for n, p in stack.processes().items()}
    processes_before = stack.our_processes()
    supervisor = stack.status()["supervisor_pid"]
    os.kill(supervisor, signal.SIGKILL)
    wait_until(lambda: not pid_alive(supervisor), 5, "supervisor gone")
    orphaned = stack.ctl("status", "--json")
    assert orphaned.returncode == 1 and not json.loads(orphaned.stdout)["running"]
    result = stack.ctl("up", str(stack.spec), "--json")
    assert result.returncode == 0, result.stderr
    after = {n: p["pid"] for n, p in stack.processes().items()}
    assert after == before, "the same processes, adopted, none started twice"
    new_supervisor = stack.status()["supervisor_pid"]
    assert new_supervisor != supervisor
    assert len(stack.our_processes()) == len(processes_before)


def test_prometheus_scrapes_the_stack(stack: Stack) -> None:
    """The stack's own Prometheus (rendered config) scrapes every part of it, and Alertmanager is up."""
    procs = stack.processes()
    assert procs["prometheus"]["state"] == "healthy" and procs["alertmanager"]["state"] == "healthy"
    base = f"http://127.0.0.1:{stack.ports.prometheus}"
    stack.openai().models.list()  # at least one decision and one request to count

    def all_up() -> bool:
        targets = httpx.get(f"{base}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)

    wait_until(all_up, 60, "every scrape target up")
    jobs = {t["labels"]["job"] for t in httpx.get(f"{base}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]}
    assert {"envoy", "gatekeeper", "workers", "agents", "prometheus", "alertmanager"} <= jobs
    for series in (
        "envoy_cluster_membership_healthy",
        "fleet_gatekeeper_decisions_total",
        "llamacpp:requests_processing",
        "fleet_worker_up",
        "fleet:model_queue_depth",
    ):

        def present(name: str = series) -> bool:
            reply = httpx.get(f"{base}/api/v1/query", params={"query": name}, timeout=5).json()
            return bool(reply["data"]["result"])

        wait_until(present, 60, f"{series} in Prometheus")


def test_the_commands_up_prints_work_in_a_new_shell(stack: Stack) -> None:
    """`up` prints how to see and stop the stack; a new shell (no virtual environment on PATH) runs them as printed."""
    result = stack.ctl("up", str(stack.spec))
    assert result.returncode == 0, result.stderr
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("status: ")]
    status, stop = (part.strip() for part in line.removeprefix("status: ").split("stop: "))
    assert stop == status.replace(" status", " down", 1)  # the same program, the same state folder
    fresh = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    shown = subprocess.run(["bash", "-c", status], env=fresh, capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    assert "tiny-chat-local-cpu-1" in shown.stdout
