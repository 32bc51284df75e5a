"""vLLM's sleep mode, scheduler figures, runners and their APIs (the Responses API; rerank and embeddings of a
pooling model), the real `vllm serve` where installed, else the double (tests/doubles/vllm.py).

Each behaviour checked here is vLLM 0.11.0's (the pinned image), read in its source; the double's docstring says
where. The controller's calls (controller/backends/client.py) are checked against the same server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)

from controller.backends.client import WorkerClient, parse_prometheus
from controller.errors import BackendError
from controller.local.processes import base_env
from controller.spec.models import Model
from tests.contract.test_backends import program
from tests.doubles.common import PACE_ENV
from tests.stubs import free_ports, wait_until

pytestmark = pytest.mark.contract
MODEL = os.environ.get("FLEET_VLLM_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")
NAME = "vl"  # its served name
KEY = "sk-test-worker"
SLEEP_ROUTES = [("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping")]
# Long enough to be seen in flight on a real GPU; the double answers at most 64 tokens, each the `pace` that
# start_vllm gives it: SLOW where a test must see requests in flight (over 6 s each), else FAST.
LONG = 2000
FAST, SLOW = 0.01, 0.1


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self) -> WorkerClient:
        return WorkerClient("vllm", self.url, timeout=30, key=KEY)

    def sleeping(self) -> bool:
        answer = httpx.get(f"{self.url}/is_sleeping", timeout=30)
        assert answer.status_code == 200, answer.text
        return bool(answer.json()["is_sleeping"])

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=300, **kwargs)

    def chat(self, max_tokens: int = 8) -> httpx.Response:
        body = {
            "model": NAME,
            "messages": [{"role": "user", "content": "Count from one to ten."}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=auth(), timeout=120)

    def answer(self) -> str:
        reply = self.chat()
        assert reply.status_code == 200, reply.text
        return str(reply.json()["choices"][0]["message"]["content"])

    def openai(self) -> openai.OpenAI:
        """The official SDK on this server's /v1 with the worker key."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, timeout=120, max_retries=0)

    def figure(self, name: str) -> float:
        """One `vllm:*` series from /metrics, summed over its labels (0 while absent)."""
        answer = httpx.get(f"{self.url}/metrics", timeout=30)
        assert answer.status_code == 200, answer.text
        return parse_prometheus(answer.text).get(name, 0.0)


Start = Callable[..., Server]


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def start_vllm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Start]:
    """``start(*flags, dev_mode="1", pace=FAST)``: `vllm serve` on a free loopback port with the worker key, served
    as NAME; ``dev_mode`` is VLLM_SERVER_DEV_MODE's value (None: not set); ``pace``: the double's seconds per token.
    Waits until healthy."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kind = program("vllm", bin_dir, capsys)
    exe = shutil.which("vllm") if kind == "real" else str(bin_dir / "vllm")
    assert exe
    started: list[subprocess.Popen[bytes]] = []

    def start(*flags: str, dev_mode: str | None = "1", pace: float = FAST, wait: bool = True) -> Server:
        (port,) = free_ports(1)
        env = base_env()
        env.pop("VLLM_SERVER_DEV_MODE", None)
        if dev_mode is not None:
            env["VLLM_SERVER_DEV_MODE"] = dev_mode
        if kind == "double":
            env |= {"CUDA_VISIBLE_DEVICES": "GPU-00000000-0000-4000-8000-000000000001", PACE_ENV: str(pace)}
        argv = [exe, "serve", MODEL, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", NAME]
        argv += ["--api-key", KEY, "--max-model-len", "2048", "--gpu-memory-utilization", "0.3", *flags]
        log = tmp_path / f"vllm-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        server = Server(f"http://127.0.0.1:{port}", proc, log)
        if wait:
            with server.client() as client:
                limit = 60 if kind == "double" else 600
                wait_until(lambda: proc.poll() is not None or client.healthy(), limit, "vllm healthy")
            assert proc.poll() is None, log.read_text()
        return server

    yield start
    for proc in started:
        proc.terminate()
    for proc in started:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("dev_mode", [None, "0", "1"], ids=["unset", "0", "1"])
def test_the_sleep_routes_exist_only_in_development_mode(start_vllm: Start, dev_mode: str | None) -> None:
    """Without VLLM_SERVER_DEV_MODE=1 the sleep routes are 404, as any unknown route; with it they answer, and not
    behind the API key, which guards only /v1 (--enable-sleep-mode given both times)."""
    server = start_vllm("--enable-sleep-mode", dev_mode=dev_mode)
    unknown = httpx.post(f"{server.url}/no-such-route", timeout=30)
    assert unknown.status_code == 404
    assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401  # the key is in force
    if dev_mode != "1":
        for method, path in SLEEP_ROUTES:
            reply = httpx.request(method, f"{server.url}{path}", timeout=30)
            assert (reply.status_code, reply.json()) == (404, unknown.json()), path
        return
    assert server.sleeping() is False
    assert server.post("/sleep").status_code == 200  # no key: these routes are outside /v1
    assert server.sleeping() is True
    assert server.post("/wake_up").status_code == 200
    assert server.sleeping() is False


def test_development_mode_must_be_an_integer(start_vllm: Start) -> None:
    """vLLM reads VLLM_SERVER_DEV_MODE as bool(int(value)): "true" stops it at start."""
    server = start_vllm(dev_mode="true", wait=False)
    assert server.proc.wait(300) != 0
    assert "ValueError" in server.log.read_text()


def test_level_1_keeps_the_weights_and_level_2_drops_them(start_vllm: Start) -> None:
    """Level 1 moves the weights to CPU memory and back; level 2 discards them, so the woken model answers garbage
    until `/collective_rpc` reload_weights."""
    server = start_vllm("--enable-sleep-mode")
    before = server.answer()
    assert server.post("/sleep", params={"level": 1}).status_code == 200
    assert server.sleeping()
    assert server.post("/wake_up").status_code == 200
    assert not server.sleeping()
    assert server.answer() == before
    assert server.post("/sleep", params={"level": 2}).status_code == 200
    assert server.post("/wake_up").status_code == 200
    assert not server.sleeping()
    assert server.answer() != before
    reload = server.post("/collective_rpc", json={"method": "reload_weights"})
    assert reload.status_code == 200, reload.text
    assert server.answer() == before


def test_wake_up_by_tags(start_vllm: Start) -> None:
    """`/wake_up?tags=` wakes only those; one that is not asleep makes it do nothing; it sleeps until all are up."""
    server = start_vllm("--enable-sleep-mode")
    before = server.answer()
    assert server.post("/sleep", params={"level": 1}).status_code == 200
    assert server.post("/sleep", params={"level": 2}).status_code == 200  # already asleep: nothing happens
    assert server.post("/wake_up", params={"tags": ["no-such-tag", "weights"]}).status_code == 200
    assert server.sleeping()
    assert server.post("/wake_up", params={"tags": "weights"}).status_code == 200
    assert server.sleeping()  # the KV cache still sleeps
    assert server.post("/wake_up", params={"tags": "kv_cache"}).status_code == 200
    assert not server.sleeping()
    assert server.answer() == before  # the level-1 sleep's weights are back: the level-2 /sleep did nothing


def test_without_sleep_mode_sleep_frees_nothing(start_vllm: Start) -> None:
    """Without --enable-sleep-mode the model was not allocated where sleep mode can release it: /sleep answers 200
    and is_sleeping turns true, yet the model still serves."""
    server = start_vllm()
    before = server.answer()
    assert server.post("/sleep", params={"level": 1}).status_code == 200
    assert server.sleeping()
    assert server.answer() == before
    assert server.post("/wake_up").status_code == 200
    assert not server.sleeping()


def test_serving_while_asleep_kills_the_engine(start_vllm: Start) -> None:
    """With sleep mode, a request while asleep touches released GPU memory: no answer, and the server exits."""
    server = start_vllm("--enable-sleep-mode")
    assert server.post("/sleep").status_code == 200
    try:
        status = server.chat().status_code
    except httpx.HTTPError:
        status = None  # the server went before it answered
    assert status != 200
    assert server.proc.wait(120) != 0
    assert "illegal memory access" in server.log.read_text()


def test_num_requests_running_counts_the_requests_in_flight(start_vllm: Start) -> None:
    """`vllm:num_requests_running` is the requests being served, at most --max-num-seqs; the rest wait
    (`vllm:num_requests_waiting`); both go back to 0 when the answers are done."""
    server = start_vllm("--max-num-seqs", "2", dev_mode=None, pace=SLOW)
    streams = [Stream(server.url) for _ in range(3)]
    with server.client() as client:

        def figures() -> tuple[float, float]:
            got = client.metrics()
            return got["running"], got["waiting"]

        assert figures() == (0, 0)
        for stream in streams[:2]:
            stream.start()
        wait_until(lambda: figures() == (2, 0), 60, "2 running, 0 waiting")
        streams[2].start()
        wait_until(lambda: figures() == (2, 1), 60, "2 running, 1 waiting")
        assert client.queue_depth() == 3
        for stream in streams:
            stream.join(300)
        wait_until(lambda: figures() == (0, 0), 60, "0 running, 0 waiting")
    for stream in streams:
        assert stream.events and stream.events[-1] == "[DONE]", stream.events[-3:]


def test_the_client_sleeps_and_wakes_a_drained_worker(start_vllm: Start) -> None:
    """The controller's unload (sleep, level 1), load (wake up) and loaded (is_sleeping) on a worker in development
    mode with sleep mode; unload refuses a worker without sleep mode and one with a request in flight."""
    server = start_vllm("--enable-sleep-mode", pace=SLOW)
    model = Model.model_validate(
        {
            "name": NAME,
            "backend": "vllm",
            "source": {"huggingface": MODEL},
            "context": 2048,
            "options": {"enable-sleep-mode": True},
        }
    )
    with server.client() as client:
        assert client.loaded(model)
        client.unload(model)
        assert not client.loaded(model)
        client.load(model)
        assert client.loaded(model)
        assert server.chat().status_code == 200
        with pytest.raises(BackendError, match="without --enable-sleep-mode, sleeping frees no GPU memory"):
            client.unload(model.model_copy(update={"options": {}}))
        stream = Stream(server.url)
        stream.start()
        wait_until(lambda: client.metrics().get("running") == 1, 60, "a request in flight")
        with pytest.raises(BackendError, match="requests running or waiting: 1; drain the worker"):
            client.unload(model)
        assert client.loaded(model)  # it did not sleep
        stream.join(300)
        assert stream.events[-1:] == ["[DONE]"]
        assert server.proc.poll() is None


class Stream(threading.Thread):
    """A streamed chat request of LONG tokens (`ignore_eos`, vLLM's extra sampling parameter), read to its end."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events: list[str] = []

    def run(self) -> None:
        body = {
            "model": NAME,
            "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": LONG,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, headers=auth(), timeout=300) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line.removeprefix("data: "))


def test_speculative_config_is_one_json_object_checked_at_start(start_vllm: Start) -> None:
    """`--speculative-config` as vLLM 0.11.0 takes it: an n-gram configuration starts and serves (MTP needs a model
    with MTP layers, which the test model has not); a value that is no JSON is an argparse error;
    num_speculative_tokens without a model (unless ngram or mtp), a bad n-gram window and a draft model stop it at
    start, the last with vLLM 0.11's NotImplementedError (its engine has no draft-model speculation)."""
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
    server = start_vllm("--speculative-config", json.dumps(ngram), "--enable-sleep-mode", dev_mode=None)
    assert server.answer()
    refused = {
        "{method: ngram}": "speculative-config",
        json.dumps({"num_speculative_tokens": 3}): "num_speculative_tokens was provided but without speculative model",
        json.dumps({"model": MODEL, "num_speculative_tokens": 3}): "draft model is not supported yet",
        json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 5, "prompt_lookup_max": 2}): (
            "prompt_lookup_min=5 must be <= prompt_lookup_max=2"
        ),
    }
    for value, error in refused.items():
        stopped = start_vllm("--speculative-config", value, dev_mode=None, wait=False)
        assert stopped.proc.wait(300) != 0, value
        assert error in stopped.log.read_text(), (value, stopped.log.read_text()[-2000:])


PROMPT = "Count from one to ten."  # Server.chat's


def test_responses_answer_what_chat_completions_answer(start_vllm: Start) -> None:
    """`POST /v1/responses` through the official SDK: a completed response whose text and token counts are those of
    the chat completion of the same message; `instructions` are a system message before the input, counted in
    input_tokens (the longer, the more); the generated tokens are counted in vllm:generation_tokens_total."""
    server = start_vllm(dev_mode=None)
    chat = server.chat(max_tokens=8)
    assert chat.status_code == 200, chat.text
    expected = chat.json()
    client = server.openai()
    before = server.figure("vllm:generation_tokens_total")
    reply = client.responses.create(model=NAME, input=PROMPT, max_output_tokens=8, temperature=0)
    assert reply.status == "completed"
    assert reply.id.startswith("resp_") and reply.object == "response" and reply.model == NAME
    assert [item.type for item in reply.output] == ["message"]
    assert (reply.output[0].id or "").startswith("msg_")
    assert reply.output_text == expected["choices"][0]["message"]["content"]
    assert reply.max_output_tokens == 8
    usage = reply.usage
    assert usage is not None
    assert usage.input_tokens == expected["usage"]["prompt_tokens"]
    assert usage.output_tokens == expected["usage"]["completion_tokens"]
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens >= 0 and usage.output_tokens_details.reasoning_tokens == 0
    wait_until(
        lambda: server.figure("vllm:generation_tokens_total") == before + usage.output_tokens,
        30,
        "the response's tokens counted",
    )
    brief, long = "Answer in French.", "Answer in French, in one short sentence, and spell every number out."
    briefed = [
        client.responses.create(
            model=NAME, input=[{"role": "user", "content": PROMPT}], instructions=text, max_output_tokens=4
        )
        for text in (brief, long)
    ]
    assert [b.instructions for b in briefed] == [brief, long]
    counted = [b.usage for b in briefed]
    assert counted[0] is not None and counted[1] is not None
    assert counted[0].output_tokens <= 4 and counted[1].input_tokens > counted[0].input_tokens


def test_a_streamed_response_is_the_responses_event_sequence(start_vllm: Start) -> None:
    """`stream: true`: the SDK reads created, in_progress, the item and part added, the text deltas, the text, part
    and item done, then completed with the usage (null before), numbered from 0; the request runs (and is counted in
    vllm:num_requests_running) until its last event. vLLM 0.11.0 numbers each delta's content_index on from the
    added part's 0."""
    server = start_vllm(dev_mode=None, pace=SLOW)
    stream = server.openai().responses.create(
        model=NAME, input="Tell a long story.", max_output_tokens=LONG, stream=True
    )
    events: list[ResponseStreamEvent] = []
    with server.client() as worker:
        for event in stream:
            events.append(event)
            if len(events) == 1:
                assert worker.metrics().get("running") == 1  # in flight until its end
        assert worker.metrics().get("running") == 0
    types = [e.type for e in events]
    head = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    tail = [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert types[:4] == head and types[-4:] == tail, types
    deltas = [e for e in events[4:-4] if isinstance(e, ResponseTextDeltaEvent)]
    assert deltas and len(deltas) == len(events) - 8, types
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, done, completed = events[0], events[-4], events[-1]
    assert isinstance(created, ResponseCreatedEvent) and isinstance(completed, ResponseCompletedEvent)
    assert isinstance(done, ResponseTextDoneEvent)
    assert created.response.status == "in_progress" and created.response.output == []
    assert created.response.usage is None
    assert completed.response.id == created.response.id
    assert completed.response.status == "completed"
    text = "".join(e.delta for e in deltas)
    assert text and text == done.text == completed.response.output_text
    usage = completed.response.usage
    assert usage is not None and 0 < len(deltas) <= usage.output_tokens <= LONG
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens and usage.input_tokens > 0
    assert [e.content_index for e in deltas] == list(range(1, len(deltas) + 1))


def rerank(server: Server, path: str = "/v1/rerank", **extra: Any) -> httpx.Response:
    body = {"model": NAME, "query": QUERY, "documents": DOCUMENTS, **extra}
    return httpx.post(f"{server.url}{path}", json=body, headers=auth(), timeout=120)


QUERY = "What is the capital of France?"
DOCUMENTS = ["Bananas are yellow.", "What is the capital of France?", "Paris is the capital of France."]


def test_a_pooling_model_reranks_documents(start_vllm: Start) -> None:
    """`--runner pooling`: `/v1/rerank` scores every document against the query, highest first (the query itself
    ranks first), `top_n` keeps the best n; usage is only total_tokens, of every document scored whatever top_n.
    `/rerank` is the same API outside /v1, so the API key does not guard it."""
    server = start_vllm("--runner", "pooling", dev_mode=None)
    reply = rerank(server)
    assert reply.status_code == 200, reply.text
    full = reply.json()
    assert full["id"].startswith("rerank-") and full["model"] == NAME
    results = full["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["index"] == 1
    assert all(r["document"]["text"] == DOCUMENTS[r["index"]] for r in results)
    assert list(full["usage"]) == ["total_tokens"] and full["usage"]["total_tokens"] > 0
    top = rerank(server, top_n=2).json()
    assert [r["index"] for r in top["results"]] == [r["index"] for r in results[:2]]
    assert [r["relevance_score"] for r in top["results"]] == pytest.approx(scores[:2], rel=1e-3)
    assert top["usage"] == full["usage"]
    open_route = httpx.post(f"{server.url}/rerank", json={"query": QUERY, "documents": DOCUMENTS}, timeout=120)
    assert open_route.status_code == 200, open_route.text
    assert [r["index"] for r in open_route.json()["results"]] == [r["index"] for r in results]


def test_a_pooling_model_embeds(start_vllm: Start) -> None:
    """`/v1/embeddings` of a pooling model through the SDK (which asks for base64): one unit vector per input, the
    same text the same vector; usage counts the prompt tokens only."""
    server = start_vllm("--runner", "pooling", dev_mode=None)
    texts = ["The capital of France.", "Bananas are yellow.", "The capital of France."]
    answer = server.openai().embeddings.create(model=NAME, input=texts)
    vectors = [item.embedding for item in answer.data]
    assert [item.index for item in answer.data] == [0, 1, 2]
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 1
    for vector in vectors:
        assert sum(x * x for x in vector) == pytest.approx(1.0, rel=1e-3)
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-4)
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-4)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 0


def refusal(api: str) -> dict[str, Any]:
    return {
        "error": {
            "message": f"The model does not support {api} API",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    }


def test_each_runner_refuses_the_other_runners_apis(start_vllm: Start) -> None:
    """A pooling model has no chat, completions or responses, a generate model no rerank or embeddings: vLLM 0.11.0
    answers each with its error object (code 400) that FastAPI sends with HTTP status 200, since the route returns
    it (vllm-project/vllm#21704). The API each runner has still answers."""
    pooling = start_vllm("--runner", "pooling", dev_mode=None)
    asks = {
        "/v1/chat/completions": (
            {"model": NAME, "messages": [{"role": "user", "content": PROMPT}]},
            "Chat Completions",
        ),
        "/v1/completions": ({"model": NAME, "prompt": PROMPT}, "Completions"),
        "/v1/responses": ({"model": NAME, "input": PROMPT}, "Responses"),
    }
    for path, (body, api) in asks.items():
        reply = httpx.post(f"{pooling.url}{path}", json=body, headers=auth(), timeout=60)
        assert (reply.status_code, reply.json()) == (200, refusal(api)), path
    assert rerank(pooling).status_code == 200
    generate = start_vllm("--runner", "generate", dev_mode=None)
    reply = rerank(generate)
    assert (reply.status_code, reply.json()) == (200, refusal("Rerank (Score)"))
    reply = httpx.post(f"{generate.url}/v1/embeddings", json={"model": NAME, "input": "x"}, headers=auth(), timeout=60)
    assert (reply.status_code, reply.json()) == (200, refusal("Embeddings"))
    assert generate.answer()


def test_the_runner_is_one_of_vllms(start_vllm: Start) -> None:
    """`--runner` takes auto, draft, generate or pooling; anything else is an argparse error at start."""
    server = start_vllm("--runner", "embedding", wait=False)
    assert server.proc.wait(300) != 0
    log = server.log.read_text()
    assert "argument --runner: invalid choice" in log and "'embedding'" in log, log[-2000:]
