"""Backend adapters: what each inference server needs to run one worker.

One module per backend (vLLM, Ollama, llama.cpp). Each knows its container
image, port, health endpoint, the flags that make the plan's VRAM estimate
true at run time, and which flags the plan owns (so spec `options` cannot
override them). Renderers and the local supervisor ask the adapter; they do
not know backend details themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol

from controller.plan.models import Estimate, GpuRef, Worker
from controller.spec.models import Fleet, Model


class Backend(Protocol):
    name: str
    container_port: int
    health_path: str
    metrics_path: str
    cache_dir: str  # model cache inside the container
    reserved: ClassVar[dict[str, str]]  # flag (or variable) → why the plan owns it

    def settings(self, model: Model, estimate: Estimate, gpus: list[GpuRef]) -> dict[str, Any]: ...

    def image(self, fleet: Fleet, worker: Worker) -> str: ...

    def container_args(self, worker: Worker, model: Model, key_file: str) -> list[str]: ...

    def container_env(self, worker: Worker, model: Model) -> dict[str, str]: ...

    def healthcheck(self) -> list[str]: ...

    def local_command(
        self, worker: Worker, model: Model, spec_dir: Path, find: Callable[[str], str], key_file: Path
    ) -> tuple[list[str], dict[str, str]]:
        """argv and extra environment to run this worker as a local process (`controller up`), requiring the
        worker secret in ``key_file`` (see controller/secrets.py)."""
        ...

    def container_entrypoint(self, key_file: str) -> list[str]:
        """The container's entrypoint when the image's own cannot read the worker secret from a file
        (empty: the image's own, with the secret in its arguments' file option)."""
        ...


def unloads_by_stopping(model: Model) -> bool:
    """Whether an on-demand model's worker is unloaded by stopping it (and loaded by starting it): llama.cpp's
    always (a single-model llama-server cannot unload), vLLM's with `swap.unload: stop`; a sleeping vLLM and
    Ollama keep their process."""
    return model.backend == "llamacpp" or (model.swap is not None and model.swap.unload == "stop")


# Runs a program with one environment variable set from a file: for a backend that reads its API key only
# from the environment (vLLM's VLLM_API_KEY), so the secret is in no command line, unit file or log. No `$`
# or `%`, which unit files and shells would expand. argv: VARIABLE FILE PROGRAM [ARGS...]
ENV_FROM_FILE = (
    "import os, sys; os.environ[sys.argv[1]] = open(sys.argv[2]).read().strip(); os.execvp(sys.argv[3], sys.argv[3:])"
)


def env_from_file(python: str, variable: str, key_file: str, argv: list[str]) -> list[str]:
    return [python, "-c", ENV_FROM_FILE, variable, key_file, *argv]


def get(name: str) -> Backend:
    from controller.backends import llamacpp, ollama, vllm

    registry: dict[str, Backend] = {"vllm": vllm.VLLM(), "ollama": ollama.Ollama(), "llamacpp": llamacpp.LlamaCpp()}
    return registry[name]


def reserved_options(name: str) -> dict[str, str]:
    return get(name).reserved


def option_args(options: dict[str, Any]) -> list[str]:
    """Spec `options` as separate argv items, in sorted order; `true` is a bare flag, `false` omitted."""
    args: list[str] = []
    for key in sorted(options):
        value = options[key]
        if value is True:
            args.append(f"--{key}")
        elif value is False:
            continue
        else:
            args += [f"--{key}", str(value)]
    return args
