"""Ollama: `ollama serve`, configured through OLLAMA_* variables.

Documented API used here: `GET /api/version` (health), `GET /api/tags`
(models present), `POST /api/pull`, `POST /api/copy` (the served name and
aliases are copies of the tag, so clients' `model` values resolve), `GET
/api/ps` and `POST /api/generate` (load, unload: controller/backends/client.py),
the OpenAI-compatible `/v1/*` routes, and the variables OLLAMA_CONTEXT_LENGTH,
OLLAMA_NUM_PARALLEL (the KV cache holds context × parallel tokens),
OLLAMA_MAX_LOADED_MODELS, OLLAMA_KEEP_ALIVE, OLLAMA_KV_CACHE_TYPE.

One worker holds one model and keeps it loaded: OLLAMA_MAX_LOADED_MODELS=1
(a second model would evict it: server/sched.go) and OLLAMA_KEEP_ALIVE=-1
(a model loaded by a request without `keep_alive`, as the OpenAI-compatible
routes send, stays for good instead of Ollama's 5 minutes: envconfig
KeepAlive). Both matter most for an on-demand model (`swap`): the swap
coordinator loads and unloads it (`/api/generate` with `keep_alive` -1 and
0), so Ollama must never unload it on its own behind the coordinator's back.
The plan owns both variables (`reserved`), so a spec's options cannot change
them. Ollama has no speculative decoding (controller/spec/speculative.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from controller.plan.models import Estimate, GpuRef, Worker
from controller.spec.models import Fleet, Model

KV_TYPES = {"auto": "f16", "float16": "f16", "q8_0": "q8_0", "q4_0": "q4_0"}


class Ollama:
    name = "ollama"
    container_port = 11434
    health_path = "/api/version"
    metrics_path = ""  # Ollama exports no Prometheus metrics
    cache_dir = "/root/.ollama"
    reserved: ClassVar[dict[str, str]] = {
        "OLLAMA_HOST": "the plan binds the worker",
        "OLLAMA_CONTEXT_LENGTH": "the spec's context",
        "OLLAMA_NUM_PARALLEL": "the spec's parallel",
        "OLLAMA_MAX_LOADED_MODELS": "one model per worker",
        "OLLAMA_KV_CACHE_TYPE": "the spec's kv_cache_dtype",
        "OLLAMA_MODELS": "the model cache volume",
        "OLLAMA_ORIGINS": "workers are reached only through the gateway",
        "OLLAMA_KEEP_ALIVE": "the worker keeps its model loaded; the swap coordinator unloads on-demand ones",
    }

    def settings(self, model: Model, estimate: Estimate, gpus: list[GpuRef]) -> dict[str, Any]:
        return {
            "context_length": model.context,
            "num_parallel": model.parallel,
            "kv_cache_type": KV_TYPES[model.kv_cache_dtype],
            "max_loaded_models": 1,
        }

    def image(self, fleet: Fleet, worker: Worker) -> str:
        return fleet.images.ollama

    def container_args(self, worker: Worker, model: Model, key_file: str) -> list[str]:
        # Ollama has no authentication of its own: its guard requires the worker secret (controller/render/guard.py).
        return ["serve"]

    def container_entrypoint(self, key_file: str) -> list[str]:
        return []

    def container_env(self, worker: Worker, model: Model) -> dict[str, str]:
        # Loopback of the guard's network namespace, which the container joins: reachable only through the guard.
        return self.serve_env(worker, model, f"127.0.0.1:{self.container_port}")

    def serve_env(self, worker: Worker, model: Model, bind: str) -> dict[str, str]:
        s = worker.settings
        env = {
            "OLLAMA_HOST": bind,
            "OLLAMA_CONTEXT_LENGTH": str(s["context_length"]),
            "OLLAMA_NUM_PARALLEL": str(s["num_parallel"]),
            "OLLAMA_MAX_LOADED_MODELS": str(s["max_loaded_models"]),
            "OLLAMA_KV_CACHE_TYPE": s["kv_cache_type"],
            # A model a request without keep_alive loads (the OpenAI-compatible routes) stays until unloaded on purpose.
            "OLLAMA_KEEP_ALIVE": "-1",
        }
        if s["kv_cache_type"] != "f16":
            env["OLLAMA_FLASH_ATTENTION"] = "1"  # quantized KV cache requires flash attention
        env.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in sorted(model.options.items())})
        return env

    def local_command(
        self, worker: Worker, model: Model, spec_dir: Path, find: Callable[[str], str], key_file: Path
    ) -> tuple[list[str], dict[str, str]]:
        # On the planned address; `controller up` moves it to a loopback port of its own behind its guard
        # (controller/local/processes.py, worker_process).
        return [find("ollama"), "serve"], self.serve_env(worker, model, f"{worker.address}:{worker.port}")

    def healthcheck(self) -> list[str]:
        # The image has no curl; `ollama list` fails unless the server answers.
        return ["CMD", "ollama", "list"]
