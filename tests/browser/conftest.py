"""The browser tier: the operator console of a running stack in headless Chromium (Debian's `chromium`), driven by
Playwright from PyPI with `executable_path` (no browser download).

The stack: the demo's CPU workers (one chat replica, the embedding model), a vLLM model (the vLLM double, paced so a
stream lasts seconds) on one of two fake GPUs (the NVML double, scripted), an on-demand llama.cpp model, and a user
who is not an admin. The browser trusts nothing it was not told: the stack's certificate is from its own CA, which
Chromium is not given, so the context ignores certificate errors (the chain itself is tested in tests/e2e).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.doubles.nvml import GIB, write_scenario
from tests.e2e.stack import Stack, cli, start_stack, stop_stack
from tests.e2e.test_monitoring_stack import GPU_MODEL, fake_gpus, vllm_shim, wait_pinned
from tests.e2e.test_monitoring_stack import customize as with_gpus

CHROMIUM = "/usr/bin/chromium"
# Without the networking flags Chromium keeps dialling Google's hosts, which this machine refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ON_DEMAND = "tiny-later"
PLAIN_USER = "alice"
SECONDS_PER_TOKEN = 0.05  # the vLLM double's pace: an 80-token stream runs about 4 s


@dataclass
class Console:
    stack: Stack
    scenario: Path
    plain_key: str
    vllm_worker: str
    vllm_pid: int

    @property
    def url(self) -> str:
        return f"{self.stack.base_url.removesuffix('/v1')}/console"


def customize(data: dict[str, Any]) -> None:
    with_gpus(data)
    data["users"].append({"name": PLAIN_USER, "models": ["*"]})
    data["swap_groups"] = [{"name": "later", "host": "local", "cpu_slots": 1, "min_resident_s": 0}]
    chat = next(m for m in data["models"] if m["name"] == "tiny-chat")
    data["models"].append(
        {
            "name": ON_DEMAND,
            "backend": "llamacpp",
            "source": chat["source"],
            "context": 1024,
            "options": {"threads": 1},
            "device": "cpu",
            "swap": {"group": "later"},
        }
    )


@pytest.fixture(scope="session")
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} not found; install Debian's chromium (scripts/bootstrap does)"
        if os.environ.get("FLEET_REQUIRE_TOOLS") == "1":
            pytest.fail(reason + " (FLEET_REQUIRE_TOOLS=1)")
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    for tool in ("envoy", "caddy"):
        if shutil.which(tool) is None and not Path(f".venv/bin/{tool}").exists():
            pytest.fail(f"{tool} not found; scripts/bootstrap installs it")
    tmp = tmp_path_factory.mktemp("console")
    scenario = tmp / "nvml-scenario.json"
    write_scenario(scenario, fake_gpus({}))
    env = {
        "PATH": f"{vllm_shim(tmp / 'bin')}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "FLEET_AGENT_NVML": "tests.doubles.nvml:scenario_nvml",
        "FLEET_NVML_SCENARIO": str(scenario),
        "FLEET_DOUBLE_SECONDS_PER_TOKEN": str(SECONDS_PER_TOKEN),
    }
    print("\n[browser] vllm and NVML are the doubles in tests/doubles; Chromium is", CHROMIUM)
    stack = start_stack(tmp, customize, env=env)
    try:
        (worker, row), *_ = stack.workers(GPU_MODEL).items()
        gpu, pid = row["gpus"][0], int(row["pid"])
        write_scenario(scenario, fake_gpus({gpu: [(pid, 2 * GIB)]}))
        wait_pinned(stack, worker, "ok")
        made = cli("keys", "create", "--user", PLAIN_USER, "--state-dir", str(stack.state.root), "--json")
        assert made.returncode == 0, made.stderr
        yield Console(stack, scenario, json.loads(made.stdout)["key"], worker, pid)
    finally:
        stop_stack(stack)
