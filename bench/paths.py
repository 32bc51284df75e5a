"""The paths the gateway benchmarks measure: a `controller up` stack in front of the stub, and LiteLLM's proxy."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx

from bench.load import CHAT, MODEL, Target
from controller.gateway.rotation import ROTATED

ROOT = Path(__file__).resolve().parents[1]
LITELLM = ROOT / "bench" / ".venv-litellm" / "bin" / "litellm"
GPU = "GPU-00000000-0000-4000-8000-0000000000b1"
# The stub as the fleet's one model: a vLLM worker on a fake GPU. Envoy's circuit breakers allow
# 2 × parallel connections: room for c=256 and 512 streams.
STUB_MODEL = {
    "name": MODEL,
    "backend": "vllm",
    "source": {"huggingface": "bench/stub"},
    "context": 2048,
    "parallel": 1024,
    "arch": {"layers": 1, "kv_heads": 1, "head_dim": 8, "params_b": 0.001},
}
STUB_GPU = {"uuid": GPU, "name": "Bench GPU", "vram_gib": 80}


# -- the paths ----------------------------------------------------------------------------------


def stub_path(bin_dir: Path) -> dict[str, str]:
    """The environment whose PATH has a `vllm` shim in ``bin_dir`` starting the stub (bench/stub.py)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "vllm"
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m bench.stub "$@"\n')
    shim.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def stub_fleet(data: dict[str, Any]) -> None:
    """The demo fleet with the stub as its only model, on a (pretend) GPU."""
    data["hosts"][0]["gpus"] = [dict(STUB_GPU)]
    data["models"] = [dict(STUB_MODEL)]


# The realistic workload: many keys over users with limits, a different key on each request. The limits are
# large enough never to refuse a request of the benchmark (a refusal is cheaper than an answer): what is
# measured is what holding them costs.
TEAM_USERS = 50
TEAM_KEYS = 500
TEAM_RPM = 60_000
TEAM_DAILY_TOKENS = 10**10


def team_users(count: int = TEAM_USERS) -> list[dict[str, Any]]:
    return [
        {"name": f"team-{i:02d}", "models": ["*"], "rpm": TEAM_RPM, "daily_tokens": TEAM_DAILY_TOKENS}
        for i in range(count)
    ]


def team_keys(keys_db: Path, users: int = TEAM_USERS, count: int = TEAM_KEYS) -> list[str]:
    """``count`` keys spread evenly over the team's users, in an order that mixes users (seeded: every run alike)."""
    from controller.gateway.keystore import KeyStore

    store = KeyStore(keys_db)
    try:
        keys = [store.create(f"team-{i % users:02d}", label="bench")[0] for i in range(count)]
    finally:
        store.close()
    random.Random(12).shuffle(keys)
    return keys


def ledger_settled(usage_log: Path, ledger_db: Path, quiet_s: float = 1.5, bound_s: float = 60) -> Callable[[], None]:
    """A ``Target.settle``: wait until the usage log has stopped growing (Envoy flushes it about once a second)
    and the gatekeeper has read all of it into its ledger."""

    def offset() -> int:  # of the file now at usage_log (by its inode: a rotated log leaves its old row behind)
        try:
            inode = usage_log.stat().st_ino
        except FileNotFoundError:
            return 0
        with closing(sqlite3.connect(f"file:{ledger_db}?mode=ro", uri=True, timeout=5)) as db:
            row = db.execute("SELECT MAX(offset) FROM source WHERE inode = ?", (inode,)).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def settle() -> None:
        deadline = time.monotonic() + bound_s
        size, since = -1, time.monotonic()
        while True:
            now = time.monotonic()
            current = usage_log.stat().st_size if usage_log.exists() else 0
            if current != size:
                size, since = current, now
            elif (
                now - since >= quiet_s
                and offset() >= size
                and not usage_log.with_name(usage_log.name + ROTATED).exists()
            ):
                return
            if now > deadline:
                raise RuntimeError(f"the gatekeeper did not read {usage_log} into {ledger_db} within {bound_s:g} s")
            time.sleep(0.1)

    return settle


def bench_fleet(data: dict[str, Any]) -> None:
    """The stub fleet, with the team's users beside the demo user."""
    stub_fleet(data)
    data["users"] += team_users()


@contextmanager
def chain_stack(tmp: Path) -> Iterator[tuple[Target, Target, Target, Target]]:
    """A `controller up` stack whose only model is the stub, started by a `vllm` shim on PATH.

    Its targets: the stub itself (direct), the chain with one key of a user without limits, the chain with the
    team's keys (a different one per request, users with limits), and Envoy alone (plain HTTP, one key).
    """
    from tests.e2e.stack import cli, start_stack, stop_stack

    env = stub_path(tmp / "bin")
    customize = bench_fleet
    for attempt in range(3):  # free ports are picked one by one and may collide: try again with others
        home = tmp / f"stack{attempt}"
        try:
            stack = start_stack(home, customize, env=env)
            break
        except BaseException as exc:  # not healthy, or stopped while starting: the supervisor may be up already
            cli("down", "--state-dir", str(home / "state"))
            if attempt == 2 or not isinstance(exc, AssertionError) or "already taken" not in str(exc):
                raise
    tmp = home
    try:
        procs = stack.processes()
        (worker,) = [p for p in procs.values() if p["kind"] == "worker"]
        gateway = {kind: p["pid"] for p in procs.values() if (kind := p["kind"]) in ("caddy", "envoy", "gatekeeper")}
        stub = {"stub": worker["pid"]}
        direct = Target("direct", f"http://127.0.0.1:{worker['ports'][0]}/v1", processes=stub)
        others = {"supervisor": _supervisor(stack.state.root), "agent": procs["agent"]["pid"], **stub}
        others = {k: v for k, v in others.items() if v}
        settle = ledger_settled(stack.state.usage_log, stack.state.gatekeeper / "usage.db")
        chain = Target("chain", stack.base_url, stack.key, processes=gateway, others=others, settle=settle)
        keys = team_keys(stack.state.gatekeeper / "keys.db")
        team = Target("chain-keys", stack.base_url, keys=keys, processes=gateway, others=others, settle=settle)
        # A breakdown, not a client path: Envoy's plain-HTTP loopback listener with the same key, so Envoy and
        # its Lua filter (authentication included) are measured without TLS.
        envoy_only = Target(
            "envoy-only",
            f"http://127.0.0.1:{stack.ports.envoy}/v1",
            stack.key,
            processes={"envoy": gateway["envoy"], "gatekeeper": gateway["gatekeeper"]},
            others=stub,
            settle=settle,
        )
        yield direct, chain, team, envoy_only
    finally:
        try:
            stop_stack(stack)
        except BaseException:
            cli("down", "--state-dir", str(tmp / "state"))
            raise


def _supervisor(state_root: Path) -> int | None:
    marker = str(state_root).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                cmd = (entry / "cmdline").read_bytes()
                if b"controller.local.supervisor" in cmd and marker in cmd:
                    return int(entry.name)
    return None


@contextmanager
def litellm_proxy(tmp: Path, stub_url: str) -> Iterator[Target]:
    port = _free_port()
    key = "sk-bench-litellm-master"
    config = tmp / "litellm.yaml"
    stub = stub_url.removesuffix("/v1")
    config.write_text(
        json.dumps(
            {
                "model_list": [
                    {"model_name": MODEL, "litellm_params": {"model": f"openai/{MODEL}", "api_base": f"{stub}/v1"}},
                    {
                        "model_name": f"{MODEL}-stream",
                        "litellm_params": {"model": f"openai/{MODEL}", "api_base": f"{stub}/stream/v1"},
                    },
                ],
                "general_settings": {"master_key": key},
                "litellm_settings": {"drop_params": True},
            }
        )
    )
    log = (tmp / "litellm.log").open("wb")
    env = {**os.environ, "OPENAI_API_KEY": "sk-unused", "LITELLM_LOG": "ERROR", "DISABLE_ADMIN_UI": "True"}
    env.pop("DATABASE_URL", None)
    proc = subprocess.Popen(
        [str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "2"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"litellm exited: {(tmp / 'litellm.log').read_text()[-2000:]}")
            with suppress(httpx.HTTPError):
                reply = httpx.post(
                    f"{base}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}, timeout=5
                )
                if reply.status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"litellm not ready: {(tmp / 'litellm.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield Target(
            "litellm",
            f"{base}/v1",
            key,
            stream_model=f"{MODEL}-stream",
            processes={"litellm": proc.pid},
        )
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


def _litellm_version() -> str:
    python = LITELLM.parent / "python"
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=False)
    return result.stdout.strip() or "(version unknown)"


def _free_port() -> int:
    from tests.stubs import free_port

    return free_port()
