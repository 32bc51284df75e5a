"""A stack whose one (fake) GPU is a swap group of llama.cpp models of the tiny demo GGUF, sized so that one of
them is resident at a time; and what tests and bench/swap.py ask of it (tests/e2e/test_swap.py)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from controller.local.demo_model import write_demo_model
from controller.plan import Plan, make_plan
from controller.secrets import read_worker_key
from controller.spec import load_spec
from tests.conftest import ROOT
from tests.e2e.stack import Stack, running_stack
from tests.stubs import free_ports

GPU = "GPU-00000000-0000-4000-8000-0000000000d1"
MODELS = ("swap-a", "swap-b", "swap-c")


def on_demand_model(name: str, swappable: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "llamacpp",
        "source": {"gguf": "models/demo.gguf"},
        "context": 4096,
        "parallel": 2,
        "options": {"threads": 1},
        "swap": {"group": "gpu0", **({} if swappable else {"swappable": False})},
    }


def booked(tmp: Path, models: list[dict[str, Any]], gpu: str = GPU, vram_gib: float = 80) -> list[float]:
    """What each of ``models`` (of swap group gpu0) books on a GPU of ``vram_gib`` (a vLLM's booking depends on
    it: its utilization fraction is rounded up to a hundredth), by the plan."""
    plan = probe_plan(tmp, models, gpu, vram_gib)
    return [plan.workers_of(m["name"])[0].footprint_gib for m in models]


def probe_plan(tmp: Path, models: list[dict[str, Any]], gpu: str, vram_gib: float) -> Plan:
    """The plan of ``models`` as swap group gpu0 on one GPU of ``vram_gib``; the tiny demo GGUF written first."""
    write_demo_model(tmp / "models" / "demo.gguf")
    data = {
        "version": 1,
        "name": "probe",
        "mesh": {"kind": "none"},
        "hosts": [
            {
                "name": "local",
                "address": "127.0.0.1",
                "reserve_vram_gib": 0,
                "gpus": [{"uuid": gpu, "name": "G", "vram_gib": vram_gib}],
            }
        ],
        "swap_groups": [{"name": "gpu0", "host": "local"}],
        "models": models,
        "gateway": {"host": "local", "public_name": "localhost", "tls": {"mode": "internal"}},
    }
    (tmp / "fleet.yaml").write_text(yaml.safe_dump(data))
    return make_plan(load_spec(tmp / "fleet.yaml"))


def booked_gib(tmp: Path) -> float:
    """What one of the models books on a GPU (the estimate of the tiny demo GGUF)."""
    return booked(tmp, [on_demand_model("swap-a")])[0]


def doubles_on_path(tmp: Path) -> dict[str, str]:
    """An environment whose PATH finds `vllm` and `ollama` as the doubles in tests/doubles (no real ones here)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name in ("vllm", "ollama"):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m tests.doubles.{name} "$@"\n')
        shim.chmod(0o755)
    print(f"\n[backends] vllm and ollama run as the doubles in tests/doubles ({bin_dir})")
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def add_swap_group(
    data: dict[str, Any],
    booked: float,
    min_resident_s: float = 1,
    not_swappable: tuple[str, ...] = ("swap-c",),
    **group: Any,
) -> None:
    (port,) = free_ports(1)
    data["gateway"]["ports"]["swapper"] = port
    # One of the models fits at a time, not two.
    data["hosts"][0]["gpus"] = [{"uuid": GPU, "name": "Test GPU", "vram_gib": round(1.5 * booked, 2)}]
    data["hosts"][0]["reserve_vram_gib"] = 0
    data["models"] = [m for m in data["models"] if m["name"] == "tiny-chat"]
    data["models"][0]["replicas"] = 1
    data["swap_groups"] = [
        {"name": "gpu0", "host": "local", "min_resident_s": min_resident_s, "max_queue": 64, **group}
    ]
    data["models"] += [on_demand_model(name, swappable=name not in not_swappable) for name in MODELS]


@contextlib.contextmanager
def swap_stack(tmp: Path, **options: Any) -> Iterator[Stack]:
    booked = booked_gib(tmp / "probe")
    with running_stack(tmp / "stack", lambda data: add_swap_group(data, booked, **options)) as stack:
        yield stack


def swapper_port(stack: Stack) -> int:
    return int(yaml.safe_load(stack.spec.read_text())["gateway"]["ports"]["swapper"])


def swap_status(stack: Stack) -> dict[str, Any]:
    reply = httpx.get(f"http://127.0.0.1:{swapper_port(stack)}/swap/status", timeout=5)
    reply.raise_for_status()
    return dict(reply.json())


def swap_worker(stack: Stack, model: str) -> dict[str, Any]:
    return dict(next(w for w in swap_status(stack)["workers"].values() if w["model"] == model))


def swap_action(stack: Stack, action: str, model: str) -> httpx.Response:
    key = read_worker_key(stack.state.secrets)
    return httpx.post(
        f"http://127.0.0.1:{swapper_port(stack)}/swap/{action}/{model}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )


def api(stack: Stack) -> httpx.Client:
    return stack.http(timeout=120, base_url=stack.base_url, headers={"Authorization": f"Bearer {stack.key}"})


def chat(stack: Stack, model: str, max_tokens: int = 8, **extra: Any) -> httpx.Response:
    with api(stack) as http:
        return http.post(
            "/chat/completions",
            json={"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}], **extra},
        )
