"""Speculative decoding run for real: llama-server from the command line `controller up` plans.

With a draft model: the tiny random-weight GGUF (controller/local/demo_model.py) is its own draft (same tokenizer,
and with greedy sampling every guess is right), so the server's timings show drafted and accepted tokens. With
n-grams of the prompt (`--spec-type ngram-simple`, where the installed llama-server has it): it starts and answers.
The flags are those the installed llama-server takes (controller/backends/llamacpp.py, `dialect_of`).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from controller.backends import llamacpp
from controller.backends.client import WorkerClient
from controller.local.demo_model import write_demo_model
from controller.local.processes import base_env, worker_processes
from controller.local.state import StateDir
from controller.plan import make_plan
from controller.secrets import ensure_worker_secret, read_worker_key
from controller.spec import load_spec
from tests.helpers import write_spec
from tests.llama import llama_server
from tests.stubs import free_ports, gateway_ports, wait_until

pytestmark = [pytest.mark.contract, pytest.mark.timeout(60)]


SPECULATIVE = {
    "draft": {"method": "draft", "draft": {"gguf": "tiny.gguf"}, "tokens": 4},
    "ngram": {"method": "ngram", "tokens": 4},
}


@pytest.mark.parametrize("method", list(SPECULATIVE))
def test_llama_server_speculates(tmp_path: Path, method: str) -> None:
    binary = llama_server()
    if method == "ngram" and "ngram-simple" not in llamacpp._help(binary):
        pytest.skip(f"{binary} has no n-gram speculation (--spec-type ngram-simple)")
    write_demo_model(tmp_path / "tiny.gguf")
    ports = free_ports(2)
    data = {
        "version": 1,
        "name": "sd",
        "mesh": {"kind": "none"},
        "hosts": [
            {
                "name": "h",
                "address": "127.0.0.1",
                "cpu_workers": 1,
                "worker_port_base": ports[0],
                "agent_port": ports[1],
            }
        ],
        "models": [
            {
                "name": "lc",
                "backend": "llamacpp",
                "device": "cpu",
                "source": {"gguf": "tiny.gguf"},
                "context": 512,
                "speculative": SPECULATIVE[method],
                "options": {"threads": 1},
            }
        ],
        "gateway": {
            "host": "h",
            "public_name": "localhost",
            "tls": {"mode": "internal"},
            "ports": gateway_ports(exclude=ports),
        },
    }
    spec = write_spec(tmp_path / "fleet.yaml", data)
    plan = make_plan(load_spec(spec))
    (w,) = plan.workers
    state = StateDir(tmp_path / "stack")
    key_file = ensure_worker_secret(state.secrets)
    (proc_spec,) = worker_processes(plan, w, spec.parent, state)
    argv = proc_spec.argv
    if method == "draft":
        assert argv[argv.index("--model-draft") + 1] == str((tmp_path / "tiny.gguf").resolve())
        dialect = llamacpp.dialect_of(binary)
        assert (argv[argv.index("--spec-draft-n-max" if dialect == "spec-type" else "--draft-max") + 1]) == "4"
    else:
        assert argv[argv.index("--spec-type") + 1] == "ngram-simple" and "--model-draft" not in argv
    log = tmp_path / "llama.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env={**base_env(), **proc_spec.env}, stdout=out, stderr=subprocess.STDOUT)
    client = WorkerClient("llamacpp", f"http://127.0.0.1:{w.port}", key=read_worker_key(key_file.parent))
    try:
        wait_until(lambda: proc.poll() is not None or client.healthy(), 30, "llama-server with its draft healthy")
        assert proc.poll() is None, log.read_text()
        reply = client.http.post(
            "/v1/completions",
            json={"model": "lc", "prompt": "hello hello hello", "max_tokens": 16, "temperature": 0},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert answer["usage"]["completion_tokens"] == 16
        if method == "draft":
            timings = answer["timings"]
            assert timings.get("draft_n", 0) > 0 and timings["draft_n_accepted"] == timings["draft_n"], timings
            assert "draft" in log.read_text(errors="replace")
        assert httpx.get(f"{client.base_url}/health", timeout=10).status_code == 200
    finally:
        client.close()
        proc.terminate()
        proc.wait(20)
