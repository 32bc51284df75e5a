"""ansible/files/gate.py, the worker gate deploy runs on each host, against a real podman container and Ollama.

The gate watches the worker's container with the container engine (podman here, in a private store) and makes
its requests to the worker's address. The worker is the real `ollama serve` where installed, else the Ollama
double (tests/doubles/ollama.py), beside a running container that stands for the worker's (the gate reads only
its state). What it must show: an Ollama worker is gated only after the spec's tag was pulled and copied to the
spec's names (`controller.deploy.engine._prepare`), a gate without that step fails with the reason, and a dead
container fails the gate at once, with its last log lines.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.deploy.engine import _prepare
from controller.plan import make_plan
from controller.spec import load_spec
from tests.conftest import ROOT, need_tool
from tests.images import podman_store
from tests.multihost.hosts import busybox_image_tar
from tests.stubs import free_ports, wait_until

pytestmark = [pytest.mark.contract, pytest.mark.timeout(300)]
GATE = ROOT / "ansible" / "files" / "gate.py"
CONTAINER = "fleet-gate-test"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An executable that is podman on a private store, with a container running ``sleep``."""
    podman = need_tool("podman", "install podman (apt-get install podman runc)")
    need_tool("runc", "install runc (apt-get install runc)")
    folder = Path(tempfile.mkdtemp(prefix="fleet-gate-"))
    cmd, env = podman_store(folder, podman)
    wrapper = tmp_path_factory.mktemp("engine") / "podman"
    argv = " ".join(shlex.quote(c) for c in cmd)
    wrapper.write_text(f'#!/bin/sh\nexport CONTAINERS_CONF={shlex.quote(env["CONTAINERS_CONF"])}\nexec {argv} "$@"\n')
    wrapper.chmod(0o755)
    tar = folder / "busybox.tar"
    tar.write_bytes(busybox_image_tar())
    run = [str(wrapper)]
    try:
        subprocess.run([*run, "import", str(tar), "localhost/gate-busybox:1"], check=True, capture_output=True)
        started = subprocess.run(
            [*run, "run", "-d", "--name", CONTAINER, "--network", "none", "localhost/gate-busybox:1", "sleep", "600"],
            capture_output=True,
            text=True,
        )
        assert started.returncode == 0, started.stderr
        yield wrapper
    finally:
        subprocess.run([*run, "rm", "--all", "--force", "-t", "0"], capture_output=True, timeout=120, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def ollama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    (port,) = free_ports(1)
    home = tmp_path_factory.mktemp("ollama")
    env = {**os.environ, "OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_MODELS": str(home), "HOME": str(home)}
    real = shutil.which("ollama")
    if real and os.environ.get("FLEET_FORCE_DOUBLES") != "1":
        argv = [real, "serve"]
        print(f"[gate] the real ollama at {real}")
    else:
        argv = [sys.executable, "-m", "tests.doubles.ollama", "serve"]
        env["PYTHONPATH"] = str(ROOT)
        print("[gate] ollama is not installed: the double tests/doubles/ollama.py")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return httpx.get(url, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 30, "ollama answers")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def team_worker() -> tuple[Any, Any]:
    plan = make_plan(load_spec(ROOT / "examples" / "team.yaml"))
    (worker,) = [w for w in plan.workers if w.backend == "ollama"][:1]
    return plan, worker


def gate(
    engine: Path, ollama: str, tmp: Path, prepare: list[dict[str, Any]], timeout_s: float = 30
) -> subprocess.CompletedProcess[str]:
    plan, worker = team_worker()
    key = tmp / "worker-key"
    key.write_text("secret\n")
    model = plan.model(worker.model)
    body = (
        {"model": worker.served_names[0], "input": "ok"}
        if model.task == "embed"
        else {"model": worker.served_names[0], "messages": [{"role": "user", "content": "ok"}], "max_tokens": 1}
    )
    path = "/v1/embeddings" if model.task == "embed" else "/v1/chat/completions"
    args = {
        "container": CONTAINER,
        "engine": str(engine),
        "url": f"{ollama}{path}",
        "body": body,
        "key_file": str(key),
        "gpus": [],
        "timeout_s": timeout_s,
        "prepare": prepare,
    }
    encoded = base64.b64encode(json.dumps(args).encode()).decode()
    return subprocess.run([sys.executable, str(GATE), encoded], capture_output=True, text=True, timeout=timeout_s + 120)


def test_without_the_pull_the_gate_fails_with_the_reason(engine: Path, ollama: str, tmp_path: Path) -> None:
    began = time.monotonic()
    result = gate(engine, ollama, tmp_path, prepare=[], timeout_s=3)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "a one-token inference did not succeed within 3 s (HTTP 404" in result.stderr, result.stderr
    assert "not found" in result.stderr and time.monotonic() - began < 30


def test_an_ollama_worker_is_pulled_and_named_before_it_is_gated(engine: Path, ollama: str, tmp_path: Path) -> None:
    plan, worker = team_worker()
    steps = _prepare(plan, worker, ollama)
    model = plan.model(worker.model)
    tag = str(model.source.ollama)
    assert [s["what"] for s in steps] == [f"pulling {tag}"] + [
        f"naming {tag} {n}" for n in model.served_names if n != tag
    ]
    result = gate(engine, ollama, tmp_path, prepare=steps)
    assert result.returncode == 0, result.stdout + result.stderr
    done = [json.loads(line) for line in result.stdout.splitlines()]
    assert [d.get("done") for d in done[:-1]] == [s["what"] for s in steps] and done[-1]["ok"] is True
    names = {m["name"] for m in httpx.get(f"{ollama}/api/tags", timeout=10).json()["models"]}
    assert {tag, *(f"{n}:latest" for n in model.served_names if n != tag)} <= names, names
    # A second gate (a redeploy) pulls again, which only checks what is there, and passes.
    assert gate(engine, ollama, tmp_path, prepare=steps).returncode == 0


def test_a_dead_container_fails_the_gate_at_once(engine: Path, ollama: str, tmp_path: Path) -> None:
    subprocess.run([str(engine), "stop", "-t", "0", CONTAINER], check=True, capture_output=True, timeout=60)
    began = time.monotonic()
    result = gate(engine, ollama, tmp_path, prepare=[], timeout_s=60)
    assert result.returncode == 1 and f"{CONTAINER} is exited" in result.stderr, result.stderr
    assert time.monotonic() - began < 20
