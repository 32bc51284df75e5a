"""On-demand workers (a model's `swap`) as the backends run them.

vLLM: development mode (VLLM_SERVER_DEV_MODE=1) with --enable-sleep-mode, so the swap coordinator can put it to
sleep and wake it up; its development routes are outside its API key, so it runs behind the guard Ollama workers
have (controller/render/guard.py), on loopback. Ollama: OLLAMA_KEEP_ALIVE=-1 and OLLAMA_MAX_LOADED_MODELS=1, which
the plan owns. Without `swap` nothing changes (tests/test_golden.py). The contract tier runs the guard in front of
the vLLM double (tests/contract/test_vllm_guard.py).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.errors import SpecError
from controller.local import processes
from controller.local.state import StateDir
from controller.plan import Plan, make_plan
from controller.render import guard, render_all
from controller.spec import load_spec
from tests.helpers import MINIMAL, write_spec

OLLAMA = {
    "name": "ol",
    "backend": "ollama",
    "source": {"ollama": "qwen2.5:0.5b"},
    "context": 2048,
    "arch": {"layers": 24, "kv_heads": 2, "head_dim": 64, "params_b": 0.5},
}


def plan_with(tmp_path: Path, swap: bool, runtime: str = "compose", **extra: Any) -> Plan:
    data = copy.deepcopy(MINIMAL)
    data["hosts"][0]["runtime"] = runtime
    model = data["models"][0] | extra
    if swap:
        data["swap_groups"] = [{"name": "g", "host": "ws"}]
        model["swap"] = {"group": "g"}
    data["models"] = [model]
    return make_plan(load_spec(write_spec(tmp_path / "fleet.yaml", data)))


def test_an_on_demand_vllm_container_runs_in_development_mode_behind_its_guard(tmp_path: Path) -> None:
    plan = plan_with(tmp_path, swap=True)
    (w,) = plan.workers
    assert guard.guarded(plan, w)
    files = render_all(plan)
    services = yaml.safe_load(files["ws/compose.yaml"])["services"]
    vllm, caddy = services[w.name], services[guard.guard_name(w)]
    assert vllm["environment"]["VLLM_SERVER_DEV_MODE"] == "1"
    command = vllm["command"]
    assert command.count("--enable-sleep-mode") == 1
    assert command[command.index("--host") + 1] == "127.0.0.1"  # loopback of the guard's network namespace
    assert vllm["network_mode"] == f"service:{guard.guard_name(w)}" and "ports" not in vllm
    # It still requires the worker secret under /v1 itself; the guard requires it everywhere but /health.
    assert [s["target"] for s in vllm["secrets"]] == ["/run/secrets/worker_key"]
    assert "VLLM_API_KEY" in vllm["entrypoint"]
    assert caddy["ports"] == [f"{w.address}:{w.port}:8080"]
    text = files[f"ws/{guard.config_path(w)}"]
    assert "The guard of vLLM worker" in text and "reverse_proxy 127.0.0.1:8000 {" in text
    assert "path /health\n" in text
    gateway = text[text.index("handle @gateway") :]
    assert "header_up -Authorization" not in gateway.split("handle {")[0]  # vLLM gets the header on
    assert "flush_interval -1" in gateway


def test_an_on_demand_vllm_that_unloads_by_stopping_runs_as_a_plain_one(tmp_path: Path) -> None:
    """`swap.unload: stop`: the agent stops and starts its container, so no development mode, no sleep mode, no
    guard, and no sleep residue booked."""
    data = copy.deepcopy(MINIMAL)
    data["swap_groups"] = [{"name": "g", "host": "ws"}]
    data["models"] = [{**data["models"][0], "swap": {"group": "g", "unload": "stop"}}]
    plan = make_plan(load_spec(write_spec(tmp_path / "fleet.yaml", data)))
    (w,) = plan.workers
    assert not guard.guarded(plan, w) and w.asleep_gib == 0
    service = yaml.safe_load(render_all(plan)["ws/compose.yaml"])["services"][w.name]
    assert "VLLM_SERVER_DEV_MODE" not in service["environment"] and "--enable-sleep-mode" not in service["command"]
    assert service["ports"] == [f"{w.address}:{w.port}:8000"]


def test_only_vllm_chooses_how_it_unloads(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        ollama_plan(tmp_path, swap={"group": "g", "unload": "sleep"})
    (problem,) = caught.value.problems
    assert "models[0].swap.unload" in str(problem) and "only a vLLM model chooses how it unloads" in str(problem)
    assert "Ollama frees its model; remove `unload`" in str(problem)


def test_on_demand_models_are_refused_on_quadlet_hosts_for_now(tmp_path: Path) -> None:
    """A Quadlet unit restarts a container the agent stops (and removes it), so on-demand loading would fight
    systemd: refused with the reason, until the units are rendered for it."""
    with pytest.raises(SpecError) as caught:
        plan_with(tmp_path, swap=True, runtime="quadlet")
    (problem,) = caught.value.problems
    assert "on-demand models need runtime compose on host ws for now" in str(problem)


def test_without_swap_vllm_is_as_before(tmp_path: Path) -> None:
    plan = plan_with(tmp_path, swap=False)
    (w,) = plan.workers
    assert not guard.guarded(plan, w)
    files = render_all(plan)
    service = yaml.safe_load(files["ws/compose.yaml"])["services"][w.name]
    assert "VLLM_SERVER_DEV_MODE" not in service["environment"] and "--enable-sleep-mode" not in service["command"]
    assert service["command"][service["command"].index("--host") + 1] == "0.0.0.0"
    assert service["ports"] == [f"{w.address}:{w.port}:8000"]
    assert not any("/guard/" in path for path in files)


def test_sleep_mode_asked_for_in_options_is_given_once(tmp_path: Path) -> None:
    plan = plan_with(tmp_path, swap=True, options={"enable-sleep-mode": True})
    (w,) = plan.workers
    command = yaml.safe_load(render_all(plan)["ws/compose.yaml"])["services"][w.name]["command"]
    assert command.count("--enable-sleep-mode") == 1


@pytest.mark.parametrize("isolated", [False, True], ids=["plain", "own-network"])
def test_controller_up_puts_it_on_loopback_behind_its_guard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated: bool
) -> None:
    """The guard on the planned port, vLLM on a loopback port of its own (`upstream_port`), in development mode; as
    root in a network namespace of its own, which reaches no Hugging Face: the model comes from the cache."""
    monkeypatch.setattr(processes, "find_program", lambda name: f"/opt/bin/{name}")
    monkeypatch.setattr(processes, "isolated", lambda: isolated)
    plan = plan_with(tmp_path, swap=True)
    (w,) = plan.workers
    state = StateDir(tmp_path / "stack")
    caddy, vllm = processes.worker_processes(plan, w, tmp_path, state)
    assert (caddy.kind, caddy.ports, vllm.kind) == ("guard", [w.port], "worker")
    upstream = processes.upstream_port(plan, w)
    assert upstream != w.port
    argv = vllm.argv
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == str(upstream)
    assert "--enable-sleep-mode" in argv and vllm.env["VLLM_SERVER_DEV_MODE"] == "1"
    assert vllm.health_url == f"http://127.0.0.1:{w.port}/health"  # through the guard, as Envoy sees it
    config = (state.config / guard.config_path(w)).read_text()
    if isolated:
        assert argv[0] == "/opt/bin/unshare" and vllm.ports == []
        assert vllm.env["HF_HUB_OFFLINE"] == "1" and vllm.env["HF_HOME"]
        assert f"reverse_proxy unix/{processes.bridge_socket(state, w)}" in config
    else:
        assert vllm.ports == [upstream] and "HF_HUB_OFFLINE" not in vllm.env
        assert f"reverse_proxy 127.0.0.1:{upstream}" in config


def test_a_plain_vllm_worker_has_no_guard_under_controller_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "find_program", lambda name: f"/opt/bin/{name}")
    plan = plan_with(tmp_path, swap=False)
    (w,) = plan.workers
    (vllm,) = processes.worker_processes(plan, w, tmp_path, StateDir(tmp_path / "stack"))
    assert vllm.argv[vllm.argv.index("--port") + 1] == str(w.port) and "VLLM_SERVER_DEV_MODE" not in vllm.env


def ollama_plan(tmp_path: Path, **extra: Any) -> Plan:
    data = copy.deepcopy(MINIMAL)
    data["swap_groups"] = [{"name": "g", "host": "ws"}]
    data["models"] = [{**OLLAMA, "swap": {"group": "g"}, **extra}]
    return make_plan(load_spec(write_spec(tmp_path / "fleet.yaml", data)))


def test_an_on_demand_ollama_keeps_its_one_model_until_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OLLAMA_KEEP_ALIVE=-1 (a model an OpenAI-compatible request loads stays: only the coordinator unloads it) and
    OLLAMA_MAX_LOADED_MODELS=1, in containers and under `controller up`."""
    plan = ollama_plan(tmp_path)
    (w,) = plan.workers
    env = yaml.safe_load(render_all(plan)["ws/compose.yaml"])["services"][w.name]["environment"]
    assert env["OLLAMA_KEEP_ALIVE"] == "-1" and env["OLLAMA_MAX_LOADED_MODELS"] == "1"
    monkeypatch.setattr(processes, "find_program", lambda name: f"/opt/bin/{name}")
    monkeypatch.setattr(processes, "isolated", lambda: False)
    _, ollama = processes.worker_processes(plan, w, tmp_path, StateDir(tmp_path / "stack"))
    assert ollama.env["OLLAMA_KEEP_ALIVE"] == "-1" and ollama.env["OLLAMA_MAX_LOADED_MODELS"] == "1"
    assert ollama.env["OLLAMA_HOST"] == f"127.0.0.1:{processes.upstream_port(plan, w)}"


@pytest.mark.parametrize("variable", ["OLLAMA_KEEP_ALIVE", "OLLAMA_MAX_LOADED_MODELS"])
def test_the_plan_owns_keep_alive_and_max_loaded_models(tmp_path: Path, variable: str) -> None:
    with pytest.raises(SpecError) as info:
        ollama_plan(tmp_path, options={variable: "5m" if variable == "OLLAMA_KEEP_ALIVE" else 2})
    (line,) = info.value.lines()
    assert f"{variable!r} is set by the plan" in line
