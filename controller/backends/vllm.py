"""vLLM: the OpenAI-compatible server `vllm serve`.

Documented API used here: `GET /health` (200 when the engine is up),
`GET /v1/models`, `GET /metrics` (`vllm:*` series), and the flags
`--gpu-memory-utilization` (fraction of the GPU's *total* memory this
instance may take: weights, activations and KV cache), `--max-model-len`,
`--max-num-seqs`, `--tensor-parallel-size`.

Sleep mode (`/sleep`, `/wake_up`, `/is_sleeping`; controller/backends/client.py)
needs `VLLM_SERVER_DEV_MODE=1` and `--enable-sleep-mode`. The worker is not
started in development mode: its routes, sleep mode's among them, are not
behind the API key (vLLM checks the key only under /v1), and include
`/collective_rpc`, which runs any worker method.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from controller.backends import env_from_file, option_args
from controller.plan.models import Estimate, GpuRef, Worker
from controller.spec.models import Fleet, Model


class VLLM:
    name = "vllm"
    container_port = 8000
    health_path = "/health"
    metrics_path = "/metrics"
    cache_dir = "/root/.cache/huggingface"
    reserved: ClassVar[dict[str, str]] = {
        "model": "the spec's source",
        "host": "the plan binds the worker",
        "port": "the plan assigns ports",
        "served-model-name": "the spec's name and aliases",
        "gpu-memory-utilization": "derived from the VRAM estimate",
        "max-model-len": "the spec's context",
        "max-num-seqs": "the spec's parallel",
        "tensor-parallel-size": "the spec's gpus_per_replica",
        "dtype": "the spec's dtype",
        "quantization": "the spec's quantization",
        "kv-cache-dtype": "the spec's kv_cache_dtype",
        "revision": "the spec's source.revision",
        "api-key": "the worker secret, set from a file as VLLM_API_KEY",
        "download-dir": "the model cache volume",
    }

    def settings(self, model: Model, estimate: Estimate, gpus: list[GpuRef]) -> dict[str, Any]:
        smallest = min(g.vram_gib for g in gpus)
        # Round up to the next hundredth so vLLM gets at least the estimate;
        # the planner books the rounded amount.
        util = math.ceil(estimate.total_gib / smallest * 100) / 100
        return {
            "gpu_memory_utilization": util,
            "max_model_len": model.context,
            "max_num_seqs": model.parallel,
            "tensor_parallel_size": model.gpus_per_replica,
            "reserved_gib": round(util * smallest, 3),
        }

    def image(self, fleet: Fleet, worker: Worker) -> str:
        return fleet.images.vllm

    def container_args(self, worker: Worker, model: Model, key_file: str) -> list[str]:
        return [str(model.source.huggingface), *self.serve_flags(worker, model, "0.0.0.0", self.container_port)]

    def container_entrypoint(self, key_file: str) -> list[str]:
        # The image's entrypoint is `vllm serve`; vLLM reads its key from the environment only.
        return env_from_file("python3", "VLLM_API_KEY", key_file, ["vllm", "serve"])

    def serve_flags(self, worker: Worker, model: Model, host: str, port: int) -> list[str]:
        s = worker.settings
        args = [
            "--host",
            host,
            "--port",
            str(port),
            "--served-model-name",
            *model.served_names,
            "--gpu-memory-utilization",
            f"{s['gpu_memory_utilization']:.2f}",
            "--max-model-len",
            str(s["max_model_len"]),
            "--max-num-seqs",
            str(s["max_num_seqs"]),
            "--tensor-parallel-size",
            str(s["tensor_parallel_size"]),
        ]
        if model.source.revision:
            args += ["--revision", model.source.revision]
        if model.dtype != "auto":
            args += ["--dtype", model.dtype]
        if model.quantization != "none":
            args += ["--quantization", model.quantization]
        if model.kv_cache_dtype != "auto":
            args += ["--kv-cache-dtype", model.kv_cache_dtype]
        return args + option_args(model.options)

    def container_env(self, worker: Worker, model: Model) -> dict[str, str]:
        return {"HF_HOME": self.cache_dir, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}

    def local_command(
        self, worker: Worker, model: Model, spec_dir: Path, find: Callable[[str], str], key_file: Path
    ) -> tuple[list[str], dict[str, str]]:
        argv = [find("vllm"), "serve", str(model.source.huggingface)]
        argv += self.serve_flags(worker, model, worker.address, worker.port)
        # /v1/* then needs the worker secret; /health, /metrics and the rest stay open (as in vLLM).
        wrapped = env_from_file(sys.executable, "VLLM_API_KEY", str(key_file), argv)
        return wrapped, {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}

    def healthcheck(self) -> list[str]:
        return ["CMD", "curl", "-fsS", f"http://127.0.0.1:{self.container_port}{self.health_path}"]
