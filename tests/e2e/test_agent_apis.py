"""The APIs coding agents speak, through the whole chain (Envoy's TLS port, the gatekeeper, llama-server), with
the official clients: OpenAI's Responses API (`openai` SDK, `client.responses`) and Anthropic's Messages API
(`anthropic` SDK, `client.messages`, which sends its key as `x-api-key`). Each is metered into the same ledger
as chat, under the same per-user access, request rate and daily quota.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from controller.local.demo_model import write_demo_model
from tests.e2e.stack import LONG_STREAM, Stack, running_stack
from tests.e2e.test_metering import auth, chat_body, ledger_row, new_key, spent_today

pytestmark = pytest.mark.e2e

RPM = 3  # the request rate of the user "paced", for every route together
QUOTA = 400  # the daily tokens of the user "tight", for every route together


def add_users(data: dict[str, Any], reranker: Path) -> None:
    """Users with limits, and a tiny reranker (``reranker``) beside the demo's models."""
    (embed,) = [m for m in data["models"] if m["name"] == "tiny-embed"]
    rerank = {
        **embed,
        "name": "tiny-rerank",
        "task": "rerank",
        "source": {"gguf": str(reranker)},
        "options": {"threads": 1},
    }
    data["models"].append(rerank)
    data["users"] += [
        {"name": "embedder", "models": ["tiny-embed"]},
        {"name": "paced", "models": ["*"], "rpm": RPM},
        {"name": "tight", "models": ["*"], "daily_tokens": QUOTA},
    ]


CLIENTS: dict[str, anthropic.Anthropic] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("agents")
    reranker = write_demo_model(tmp / "rerank.gguf", reranker=True)  # written with `gguf`, pooling rank
    with running_stack(tmp, lambda data: add_users(data, reranker)) as running:
        try:
            yield running
        finally:
            for client in CLIENTS.values():
                client.close()
            CLIENTS.clear()


def claude(stack: Stack, key: str | None = None) -> anthropic.Anthropic:
    """The anthropic SDK as a user would point it at the gateway: its base URL (no /v1) and an API key (one
    client per key, closed with the stack)."""
    key = key or stack.key
    if key not in CLIENTS:
        http_client = anthropic.DefaultHttpxClient(verify=stack.ssl_context(), timeout=30)
        CLIENTS[key] = anthropic.Anthropic(base_url=stack.root, api_key=key, http_client=http_client, max_retries=0)
    return CLIENTS[key]


def test_responses_with_the_openai_sdk(stack: Stack) -> None:
    raw = stack.openai().responses.with_raw_response.create(model="tiny-chat", input="hello", max_output_tokens=8)
    reply = raw.parse()
    assert reply.status == "completed" and reply.output_text
    assert reply.usage is not None and reply.usage.input_tokens > 0 and 0 < reply.usage.output_tokens <= 8
    row = ledger_row(stack, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (
        reply.usage.input_tokens,
        reply.usage.output_tokens,
        0,
    )


def test_streamed_responses_with_the_openai_sdk(stack: Stack) -> None:
    with stack.openai().responses.with_streaming_response.create(
        model="tiny-chat", input="hello", max_output_tokens=8, stream=True
    ) as raw:
        request_id = raw.headers["x-request-id"]
        events = list(raw.parse())
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert any(k == "response.output_text.delta" for k in kinds)
    done = events[-1].response  # type: ignore[union-attr]
    assert done.usage is not None
    row = ledger_row(stack, request_id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (done.usage.input_tokens, done.usage.output_tokens)


def test_messages_with_the_anthropic_sdk(stack: Stack) -> None:
    raw = claude(stack).messages.with_raw_response.create(
        model="tiny-chat", max_tokens=8, messages=[{"role": "user", "content": "hello"}]
    )
    reply = raw.parse()
    assert reply.type == "message" and reply.role == "assistant" and reply.content[0].type == "text"
    assert reply.usage.input_tokens > 0 and 0 < reply.usage.output_tokens <= 8
    row = ledger_row(stack, raw.headers["x-request-id"])
    prompt = reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0)  # counted apart by this API
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (
        prompt,
        reply.usage.output_tokens,
        0,
    )


def test_streamed_messages_with_the_anthropic_sdk(stack: Stack) -> None:
    with claude(stack).messages.with_streaming_response.create(
        model="tiny-chat", max_tokens=8, messages=[{"role": "user", "content": "hello"}], stream=True
    ) as raw:
        request_id = raw.headers["x-request-id"]
        events = list(raw.parse())
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
    start = events[0].message.usage  # type: ignore[union-attr]
    (delta,) = [e for e in events if e.type == "message_delta"]
    row = ledger_row(stack, request_id)
    assert row["prompt_tokens"] == start.input_tokens + (start.cache_read_input_tokens or 0) > 0
    assert row["completion_tokens"] == delta.usage.output_tokens > 0
    assert row["estimated"] == 0


def test_a_message_stream_cut_by_its_client_is_metered_from_its_start(stack: Stack) -> None:
    """A client that leaves after a few events never sees message_delta: the ledger keeps the prompt's count from
    message_start, and estimates the answer from what passed (never less than the client received)."""
    body = {**LONG_STREAM, "messages": [{"role": "user", "content": "go"}]}
    events: list[dict[str, Any]] = []
    url = f"{stack.base_url}/messages"
    with stack.http() as client, client.stream("POST", url, json=body, headers=auth(stack.key)) as reply:
        assert reply.status_code == 200
        request_id = reply.headers["x-request-id"]
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if len(events) == 6:
                    break
    start = events[0]["message"]["usage"]
    texts = sum(1 for e in events if e["type"] == "content_block_delta")
    row = ledger_row(stack, request_id)
    assert row["estimated"] == 1 and row["prompt_tokens"] == start["input_tokens"] + start.get(
        "cache_read_input_tokens", 0
    )
    assert texts <= row["completion_tokens"] <= body["max_tokens"], (texts, row)


def test_the_anthropic_sdks_stream_helper_works_through_the_gateway(stack: Stack) -> None:
    """`messages.stream()` assembles the final message from the events. (The openai SDK's `responses.stream()`
    needs each event's `output_index`, which llama-server's Responses events do not carry: a backend matter, the
    gateway passes the events as they come; iterating `responses.create(stream=True)` works, as above.)"""
    with claude(stack).messages.stream(
        model="tiny-chat", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason in ("max_tokens", "end_turn") and final.usage.output_tokens > 0


def test_a_model_the_user_may_not_use_is_403_in_each_apis_shape(stack: Stack) -> None:
    key = new_key(stack, "embedder")
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        claude(stack, key).messages.create(model="tiny-chat", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert refused.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    with pytest.raises(openai.PermissionDeniedError) as denied:
        stack.openai(key).responses.create(model="tiny-chat", input="x", max_output_tokens=4)
    assert denied.value.code == "model_not_allowed"


def test_an_unknown_model_is_404_in_each_apis_shape(stack: Stack) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude(stack).messages.create(model="nope", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as unknown:
        stack.openai().responses.create(model="nope", input="x", max_output_tokens=4)
    assert unknown.value.code == "model_not_found"


def test_a_wrong_key_is_401_in_each_apis_shape(stack: Stack) -> None:
    with pytest.raises(anthropic.AuthenticationError) as refused:
        claude(stack, "sk-fleet-wrong-key").messages.create(
            model="tiny-chat", max_tokens=4, messages=[{"role": "user", "content": "x"}]
        )
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        stack.openai("sk-fleet-wrong-key").responses.create(model="tiny-chat", input="x", max_output_tokens=4)


def test_a_model_that_does_not_serve_the_route_is_refused_in_that_apis_shape(stack: Stack) -> None:
    """tiny-embed is an embedding model: the gateway says so, in Anthropic's shape on /v1/messages."""
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude(stack).messages.create(model="tiny-embed", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert "/v1/embeddings" in refused.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        stack.openai().responses.create(model="tiny-embed", input="x", max_output_tokens=4)
    assert bad.value.code == "unsupported_route"


def test_rerank_is_served_by_llama_cpp_and_metered(stack: Stack) -> None:
    """llama-server with `--reranking` (task rerank) answers /v1/rerank through the gateway (Jina's and
    Cohere's API, which retrieval apps call): every document scored, best first; its prompt tokens metered."""
    body = {"model": "tiny-rerank", "query": "the sky", "documents": ["blue sky", "green grass", "red"], "top_n": 2}
    with stack.http() as client:
        reply = client.post(f"{stack.base_url}/rerank", json=body, headers=auth(stack.key))
        assert reply.status_code == 200, reply.text
        results = reply.json()["results"]
        assert len(results) == 2 and {r["index"] for r in results} <= {0, 1, 2}
        assert results[0]["relevance_score"] >= results[1]["relevance_score"]
        row = ledger_row(stack, reply.headers["x-request-id"])
        assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (
            reply.json()["usage"]["prompt_tokens"],
            0,
            0,
        )
        key = new_key(stack, "embedder")  # may use tiny-embed only
        refused = client.post(f"{stack.base_url}/rerank", json=body, headers=auth(key))
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
        unknown = client.post(f"{stack.base_url}/rerank", json={**body, "model": "nope"}, headers=auth(stack.key))
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        wrong = client.post(f"{stack.base_url}/rerank", json=body, headers=auth("sk-fleet-wrong-key"))
        assert wrong.status_code == 401
        chat = client.post(
            f"{stack.base_url}/chat/completions",
            json={"model": "tiny-rerank", "messages": [{"role": "user", "content": "x"}]},
            headers=auth(stack.key),
        )
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "unsupported_route"


def test_one_request_rate_covers_every_api(stack: Stack) -> None:
    key = new_key(stack, "paced")
    stack.openai(key).chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "x"}], max_tokens=1
    )
    stack.openai(key).responses.create(model="tiny-chat", input="x", max_output_tokens=1)
    claude(stack, key).messages.create(model="tiny-chat", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.RateLimitError) as limited:
        claude(stack, key).messages.create(model="tiny-chat", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert int(limited.value.response.headers["retry-after"]) > 0
    with pytest.raises(openai.RateLimitError):
        stack.openai(key).responses.create(model="tiny-chat", input="x", max_output_tokens=1)


def test_one_daily_quota_covers_every_api(stack: Stack) -> None:
    """Chat spends part of the quota; a message whose most would pass what is left is refused before it is sent
    (429 in Anthropic's shape), and what was spent stays within the quota."""
    key = new_key(stack, "tight")
    with stack.http() as client:
        reply = client.post(f"{stack.base_url}/chat/completions", json=chat_body(100), headers=auth(key))
    assert reply.status_code == 200, reply.text
    ledger_row(stack, reply.headers["x-request-id"])
    spent = spent_today(stack, "tight")
    assert spent >= 100
    ask = QUOTA - spent + 1  # one token more than is left
    with pytest.raises(anthropic.RateLimitError) as refused:
        claude(stack, key).messages.create(
            model="tiny-chat", max_tokens=ask, messages=[{"role": "user", "content": "x"}]
        )
    assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    small = claude(stack, key).messages.with_raw_response.create(
        model="tiny-chat", max_tokens=1, messages=[{"role": "user", "content": "x"}]
    )
    row = ledger_row(stack, small.headers["x-request-id"])
    assert row["user"] == "tight" and small.parse().usage.output_tokens == row["completion_tokens"]
    assert spent_today(stack, "tight") <= QUOTA
