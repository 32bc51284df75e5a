"""vLLM: the OpenAI-compatible server `vllm serve`.

Documented API used here: `GET /health` (200 when the engine is up),
`GET /v1/models`, `GET /metrics` (`vllm:*` series), and the flags
`--gpu-memory-utilization` (fraction of the GPU's *total* memory this
instance may take: weights, activations and KV cache), `--max-model-len`,
`--max-num-seqs`, `--tensor-parallel-size`, `--speculative-config` (a JSON
object, vllm/config/speculative.py).

Sleep mode (`/sleep`, `/wake_up`, `/is_sleeping`; controller/backends/client.py)
needs `VLLM_SERVER_DEV_MODE=1` and `--enable-sleep-mode`. Only an on-demand
worker (its model has `swap`, which the swap coordinator loads by waking it
and unloads by putting it to sleep) runs in development mode; every other
worker does not. Development mode's routes, sleep mode's among them, are not
behind vLLM's API key (vLLM checks the key only under /v1), and include
`/collective_rpc`, which runs any worker method: so an on-demand worker runs
behind a guard (controller/render/guard.py), the Caddy that Ollama workers
have, which lets through only requests with the worker secret (the health
route excepted). vLLM itself then listens on loopback only: in its guard's
network namespace in containers, on a port of its own behind the guard under
`controller up` (controller/local/processes.py). It still requires the
worker secret under /v1 itself; the guard passes the header on.

Speculative decoding goes in `--speculative-config`: `{"method": "ngram",
...}`, `{"method": "mtp", ...}`, or a draft model (`{"model": REPO, ...}`),
which vLLM 0.11 (the pinned image) refuses: its V1 engine has no draft-model
speculation (the spec check says so, controller/spec/speculative.py).
"""

from __future__ import annotations

import json
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
        "hf-overrides": "the spec's rope_scaling",
        "speculative-config": "the spec's speculative",
        "runner": "the spec's task",
        "task": "the spec's task",
    }

    def settings(self, model: Model, estimate: Estimate, gpus: list[GpuRef]) -> dict[str, Any]:
        smallest = min(g.vram_gib for g in gpus)
        # vLLM's fraction covers what its memory profiler sees (weights, activations, KV cache); its CUDA context
        # and CUDA graphs come on top (estimate.outside_utilization_gib). Round the fraction up to the next
        # hundredth so vLLM gets at least the estimate; the planner books the rounded fraction plus what is outside.
        inside = estimate.total_gib - estimate.outside_utilization_gib
        util = math.ceil(inside / smallest * 100) / 100
        return {
            "gpu_memory_utilization": util,
            "max_model_len": model.context,
            "max_num_seqs": model.parallel,
            "tensor_parallel_size": model.gpus_per_replica,
            "reserved_gib": round(util * smallest + estimate.outside_utilization_gib, 3),
        }

    def image(self, fleet: Fleet, worker: Worker) -> str:
        return fleet.images.vllm

    @staticmethod
    def dev_mode(model: Model) -> bool:
        """Whether the model's workers run in development mode with sleep mode: on-demand ones (`swap`) that
        unload by sleeping (not `unload: stop`)."""
        return model.swap is not None and model.swap.unload != "stop"

    @staticmethod
    def sleep_mode(model: Model) -> bool:
        """Whether the model's workers run with --enable-sleep-mode (so that a sleep frees their GPU memory)."""
        return VLLM.dev_mode(model) or model.options.get("enable-sleep-mode") is True

    @staticmethod
    def speculative_config(model: Model) -> dict[str, Any] | None:
        """`--speculative-config` of the spec's `speculative`, in vLLM's own form (vllm/config/speculative.py)."""
        spec = model.speculative
        if spec is None:
            return None
        if spec.method == "ngram":  # n-grams of the prompt: match windows of 4 tokens, guess `tokens` after one
            return {"method": "ngram", "num_speculative_tokens": spec.tokens, "prompt_lookup_max": 4}
        if spec.method == "mtp":  # the model's own multi-token-prediction layers
            return {"method": "mtp", "num_speculative_tokens": spec.tokens}
        assert spec.draft is not None
        config: dict[str, Any] = {"model": str(spec.draft.huggingface), "num_speculative_tokens": spec.tokens}
        if spec.draft.revision:
            config["revision"] = spec.draft.revision
        return config

    def container_args(self, worker: Worker, model: Model, key_file: str) -> list[str]:
        # In development mode the container shares its guard's network namespace (controller/render/guard.py):
        # there it listens on loopback only, where only the guard reaches it.
        host = "127.0.0.1" if self.dev_mode(model) else "0.0.0.0"
        return [str(model.source.huggingface), *self.serve_flags(worker, model, host, self.container_port)]

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
        # The spec's task, never vLLM's guess from the checkpoint: a model of the other kind fails at start, rather
        # than answering every request with vLLM 0.11's "does not support … API" error (with status 200).
        args += ["--runner", "generate" if model.task == "generate" else "pooling"]
        if model.source.revision:
            args += ["--revision", model.source.revision]
        if model.dtype != "auto":
            args += ["--dtype", model.dtype]
        if model.quantization != "none":
            args += ["--quantization", model.quantization]
        if model.kv_cache_dtype != "auto":
            args += ["--kv-cache-dtype", model.kv_cache_dtype]
        if model.rope_scaling is not None and model.arch.max_context:
            # YaRN over the model's own trained length, as the model's config would say it (vLLM reads the
            # override into the Hugging Face config before it sizes the context).
            rope = {
                "rope_type": "yarn",
                "factor": model.rope_scaling,
                "original_max_position_embeddings": model.arch.max_context,
            }
            args += ["--hf-overrides", json.dumps({"rope_scaling": rope}, separators=(",", ":"))]
        speculative = self.speculative_config(model)
        if speculative is not None:
            args += ["--speculative-config", json.dumps(speculative, separators=(",", ":"))]
        if self.dev_mode(model) and model.options.get("enable-sleep-mode") is not True:
            args.append("--enable-sleep-mode")  # a sleep frees the GPU memory only with it
        return args + option_args(model.options)

    def run_env(self, model: Model) -> dict[str, str]:
        """What vLLM's environment says, wherever it runs: no usage reports; development mode where it sleeps."""
        env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        if self.dev_mode(model):
            env["VLLM_SERVER_DEV_MODE"] = "1"  # the sleep routes (and the other development routes): behind the guard
        return env

    def container_env(self, worker: Worker, model: Model) -> dict[str, str]:
        return {"HF_HOME": self.cache_dir, **self.run_env(model)}

    def local_command(
        self, worker: Worker, model: Model, spec_dir: Path, find: Callable[[str], str], key_file: Path
    ) -> tuple[list[str], dict[str, str]]:
        argv = [find("vllm"), "serve", str(model.source.huggingface)]
        argv += self.serve_flags(worker, model, worker.address, worker.port)
        # /v1/* then needs the worker secret; /health, /metrics and the rest stay open (as in vLLM), so a worker in
        # development mode runs behind its guard, which `controller up` binds where the worker was planned and puts
        # this one behind it on loopback (controller/local/processes.py, worker_process).
        wrapped = env_from_file(sys.executable, "VLLM_API_KEY", str(key_file), argv)
        return wrapped, self.run_env(model)

    def healthcheck(self) -> list[str]:
        return ["CMD", "curl", "-fsS", f"http://127.0.0.1:{self.container_port}{self.health_path}"]
