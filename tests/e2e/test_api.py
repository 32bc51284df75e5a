"""The OpenAI API through the whole chain (Envoy: TLS, the gatekeeper asked from its Lua filter → llama.cpp; behind
Caddy with FLEET_TEST_FRONT=caddy), with the official SDK."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.stack import LONG_STREAM, Stack

pytestmark = pytest.mark.e2e

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def test_models_list(stack: Stack) -> None:
    assert [m.id for m in stack.openai().models.list()] == ["tiny-chat", "tiny", "tiny-embed"]


def test_chat_completion(stack: Stack) -> None:
    reply = stack.openai().chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None and reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0


def test_text_completion_by_alias(stack: Stack) -> None:
    reply = stack.openai().completions.create(model="tiny", prompt="once upon a time", max_tokens=5)
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_embeddings(stack: Stack) -> None:
    reply = stack.openai().embeddings.create(model="tiny-embed", input=["hello", "world"])
    assert len(reply.data) == 2 and len(reply.data[0].embedding) == 64


def test_streaming_chat(stack: Stack) -> None:
    stream = stack.openai().chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=16, stream=True
    )
    chunks = [c for c in stream if c.choices]
    assert len(chunks) >= 2
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_tool_fields_pass_through_untouched(stack: Stack) -> None:
    """The worker sees the same prompt through the gateway as when asked directly: same prompt tokens."""
    body: dict[str, Any] = {
        "model": "tiny-chat",
        "max_tokens": 1,
        "tools": TOOLS,
        "tool_choice": "auto",
        "messages": [
            {"role": "user", "content": "weather in Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "rainy, 4 °C"},
        ],
    }
    via_gateway = stack.openai().chat.completions.create(**body)
    (worker,) = list(stack.workers("tiny-chat").values())[:1]
    direct = httpx.post(
        f"http://127.0.0.1:{worker['ports'][0]}/v1/chat/completions", json=body, headers=stack.worker_auth(), timeout=30
    ).json()
    assert via_gateway.usage is not None
    assert via_gateway.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    without_tools = stack.openai().chat.completions.create(
        model="tiny-chat", max_tokens=1, messages=body["messages"][:1]
    )
    assert without_tools.usage is not None and without_tools.usage.prompt_tokens < via_gateway.usage.prompt_tokens


@pytest.mark.timeout(60, func_only=True)  # a 3000-token stream, about a second of generation
def test_streaming_is_not_buffered(stack: Stack) -> None:
    """Chunks arrive as the backend makes them: spread over its generation time (by llama.cpp's own `timings`), the
    first long before the last. Both bounds are ratios of times measured under the same load, on a connection
    already open (no handshake in the first chunk's time), so a slow machine stretches both sides alike; a
    gateway that held the answer back would deliver it in one burst at the end and fail both."""
    body = {
        **LONG_STREAM,
        "stream_options": {"include_usage": True},  # llama.cpp puts its timings in the usage chunk
    }
    headers = {"Authorization": f"Bearer {stack.key}"}
    with stack.http() as client:
        client.get(f"{stack.root}/")  # connect and handshake first
        began = time.monotonic()
        first = last = None
        timings = None
        with client.stream("POST", f"{stack.base_url}/chat/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert "content-encoding" not in response.headers
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.monotonic()
                first = first or now
                last = now
                if line != "data: [DONE]":
                    timings = json.loads(line[6:]).get("timings") or timings
    assert first is not None and last is not None and timings is not None
    generation_s = timings["predicted_ms"] / 1000
    assert generation_s > 0.1, f"generation too fast to judge buffering ({generation_s:.3f}s)"
    spread, time_to_first = last - first, first - began
    assert spread > generation_s / 2, f"chunks came within {spread:.3f}s of a {generation_s:.3f}s generation"
    assert time_to_first < spread, f"first chunk after {time_to_first:.3f}s, then {spread:.3f}s to the last"


def test_requests_for_a_model_reach_only_its_workers(stack: Stack) -> None:
    chat = list(stack.workers("tiny-chat"))
    (embed,) = list(stack.workers("tiny-embed"))
    before = {n: stack.worker_counter(n) for n in [*chat, embed]}
    client = stack.openai()
    for _ in range(24):  # both replicas get some: P(all 24 to one of two) ≈ 1e-7
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    after = {n: stack.worker_counter(n) for n in [*chat, embed]}
    assert after[embed] == before[embed]
    assert all(after[n] > before[n] for n in chat), "least-request balancing used both replicas"


def test_proxy_reaches_exactly_that_worker(stack: Stack) -> None:
    target, other = list(stack.workers("tiny-chat"))
    before = {n: stack.worker_counter(n) for n in (target, other)}
    with stack.http() as client:
        reply = client.post(
            f"{stack.root}/proxy/{target}/v1/chat/completions",
            json={"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
            headers={"Authorization": f"Bearer {stack.key}"},
        )
    assert reply.status_code == 200, reply.text
    assert stack.worker_counter(target) > before[target]
    assert stack.worker_counter(other) == before[other]


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert {"message", "type", "code"} <= set(error) and error["message"]
    return error


def test_unknown_model_404(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        stack.openai().chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"


def test_malformed_json_400(stack: Stack) -> None:
    with stack.http() as client:
        reply = client.post(
            f"{stack.base_url}/chat/completions",
            content=b'{"model": "tiny-chat", "messages": [',
            headers={"Authorization": f"Bearer {stack.key}", "content-type": "application/json"},
        )
    assert _error(reply, 400)["code"] == "invalid_json"


@pytest.mark.parametrize(
    "key", [None, "", "sk-fleet-000000000000-wrong", "' OR '1'='1", "sk-fleet-aaaaaaaaaaaa-x' OR 1=1;--"]
)
def test_missing_or_wrong_key_401(stack: Stack, key: str | None) -> None:
    headers = {} if key is None else {"Authorization": f"Bearer {key}".strip()}
    with stack.http() as client:
        reply = client.post(
            f"{stack.base_url}/chat/completions", json={"model": "tiny-chat", "messages": []}, headers=headers
        )
    _error(reply, 401)
    assert reply.headers.get("www-authenticate", "").startswith("Bearer")


def test_wrong_key_with_sdk(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError):
        stack.openai(key="sk-fleet-0123456789ab-nope").models.list()


def test_body_over_limit_413(stack: Stack) -> None:
    big = {"model": "tiny-chat", "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    with stack.http() as client:
        reply = client.post(
            f"{stack.base_url}/chat/completions", json=big, headers={"Authorization": f"Bearer {stack.key}"}
        )
    assert _error(reply, 413)["code"] == "payload_too_large"


def test_http_port_redirects_to_https_and_the_sign_in_decision_endpoint_is_hidden(stack: Stack) -> None:
    """Caddy's HTTP port only redirects (to Envoy's HTTPS port); Envoy never exposes the gatekeeper's /auth/check."""
    reply = httpx.get(f"http://localhost:{stack.ports.http}/v1/models?x=1", timeout=10)
    assert reply.status_code == 308
    assert reply.headers["location"] == f"https://localhost:{stack.ports.https}/v1/models?x=1"
    with stack.http() as client:
        hidden = client.get(
            stack.base_url.removesuffix("/v1") + "/auth/check", headers={"Authorization": f"Bearer {stack.key}"}
        )
    assert hidden.status_code == 404 and "x-fleet-user" not in hidden.headers


def test_everything_still_up_after_bad_requests(stack: Stack) -> None:
    procs = stack.wait_healthy(timeout=10)
    assert all(p["restarts"] == 0 for p in procs.values()), procs
