"""On-demand models through the real chain: Envoy → swap coordinator → llama-server, on a GPU that holds one.

The stack's host declares one (fake) GPU as a swap group, 1.5 times what one llama.cpp model of the tiny demo
GGUF books; three such models share it, so one is resident at a time. llama.cpp loads by starting the worker
process and unloads by stopping it. What a client sees: a request for a model that is not resident gets its
answer after a swap; a stream of the model being evicted finishes whole before the eviction; a burst for a
non-resident model causes one load and no error; a model that may not evict others is refused with the numbers;
usage of swapped requests is metered; a resident model's requests no longer pass the coordinator.
"""

from __future__ import annotations

import concurrent.futures
import getpass
import json
import time
from collections.abc import Iterator

import pytest

from controller.plan import make_plan
from controller.spec import load_spec
from tests.e2e.stack import Stack
from tests.e2e.swapping import GPU, MODELS, api, chat, swap_action, swap_stack, swap_worker

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def swapping(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with swap_stack(tmp_path_factory.mktemp("swap")) as stack:
        yield stack


def worker_state(stack: Stack, model: str) -> str:
    return str(swap_worker(stack, model)["state"])


def loads(stack: Stack, model: str) -> int:
    return int(swap_worker(stack, model)["loads"])


def unload_all(stack: Stack) -> None:
    for model in MODELS:
        reply = swap_action(stack, "unload", model)
        assert reply.status_code == 200, reply.text


def test_a_request_for_a_model_not_resident_is_answered_after_a_swap(swapping: Stack) -> None:
    unload_all(swapping)
    assert worker_state(swapping, "swap-a") == "unloaded"
    before = loads(swapping, "swap-a")
    reply = chat(swapping, "swap-a")
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] > 0
    assert worker_state(swapping, "swap-a") == "resident"
    assert loads(swapping, "swap-a") == before + 1
    # Then swap-b evicts it (one fits at a time) and is answered too.
    reply = chat(swapping, "swap-b")
    assert reply.status_code == 200, reply.text
    assert worker_state(swapping, "swap-a") == "unloaded"
    assert worker_state(swapping, "swap-b") == "resident"
    last = swap_worker(swapping, "swap-b")["last_load"]
    assert last["unload_s"] > 0 and last["load_s"] > 0, last


def test_once_resident_requests_go_straight_to_the_worker(swapping: Stack) -> None:
    """The coordinator holds a request only until Envoy's health check has seen the model resident (1 s apart);
    from then on none passes it."""
    assert chat(swapping, "swap-a").status_code == 200
    deadline = time.monotonic() + 10
    while True:
        before = _swapper_requests(swapping)
        assert chat(swapping, "swap-a").status_code == 200
        if _swapper_requests(swapping) == before:
            break
        assert time.monotonic() < deadline, "requests for resident swap-a still pass the coordinator after 10 s"
        time.sleep(0.1)
    held_before = _swapper_requests(swapping)
    for _ in range(10):
        assert chat(swapping, "swap-a").status_code == 200
    assert _swapper_requests(swapping) == held_before, "requests for a resident model passed the coordinator"


def _swapper_requests(stack: Stack) -> int:
    stats = json.loads(stack.envoy_admin("/stats?format=json&filter=^cluster.swapper.upstream_rq_total$"))["stats"]
    return int(stats[0]["value"]) if stats else 0


def test_a_stream_of_the_evicted_model_finishes_before_the_swap(swapping: Stack) -> None:
    assert chat(swapping, "swap-a").status_code == 200
    time.sleep(1.2)  # past min_resident_s, so swap-b may evict it
    ended: dict[str, float] = {}
    tokens: list[str] = []
    finish: list[str] = []

    def stream() -> None:
        with (
            api(swapping) as http,
            http.stream(
                "POST",
                "/chat/completions",
                json={
                    "model": "swap-a",
                    "max_tokens": 3000,
                    "ignore_eos": True,
                    "stream": True,
                    "messages": [{"role": "user", "content": "go"}],
                },
            ) as reply,
        ):
            assert reply.status_code == 200
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("choices"):
                        tokens.append(chunk["choices"][0]["delta"].get("content") or "")
                        if chunk["choices"][0].get("finish_reason"):
                            finish.append(chunk["choices"][0]["finish_reason"])
                    tokens and ended.setdefault("first", time.monotonic())
        ended["stream"] = time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        streaming = pool.submit(stream)
        deadline = time.monotonic() + 30
        while "first" not in ended:
            assert time.monotonic() < deadline and not streaming.done(), "the stream never started"
            time.sleep(0.01)
        asked = time.monotonic()
        reply = chat(swapping, "swap-b")
        answered = time.monotonic()
        streaming.result(timeout=120)
    assert reply.status_code == 200, reply.text
    assert finish == ["length"], f"the evicted model's stream did not finish whole: {finish}"
    assert len(tokens) >= 2900, len(tokens)
    assert asked < ended["stream"] < answered, "the swap did not wait for the stream"


def test_a_burst_for_a_model_not_resident_causes_one_load_and_no_error(swapping: Stack) -> None:
    assert chat(swapping, "swap-a").status_code == 200
    time.sleep(1.2)
    before = loads(swapping, "swap-b")
    assert worker_state(swapping, "swap-b") == "unloaded"
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda _: chat(swapping, "swap-b"), range(20)))
    assert [r.status_code for r in replies] == [200] * 20, [r.text for r in replies if r.status_code != 200]
    assert loads(swapping, "swap-b") == before + 1


def test_a_waiting_stream_gets_comments_then_its_answer(swapping: Stack) -> None:
    unload_all(swapping)
    with (
        api(swapping) as http,
        http.stream(
            "POST",
            "/chat/completions",
            json={
                "model": "swap-a",
                "max_tokens": 8,
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "hi"}],
            },
        ) as reply,
    ):
        assert reply.status_code == 200, reply.read()
        lines = [line for line in reply.iter_lines() if line]
    assert lines[0].startswith(": loading model swap-a"), lines[:3]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    assert any('"completion_tokens":' in line for line in lines), "the stream carried no usage"


def test_a_model_that_may_not_evict_is_refused_with_the_numbers(swapping: Stack) -> None:
    assert chat(swapping, "swap-a").status_code == 200
    reply = chat(swapping, "swap-c")
    assert reply.status_code == 503, reply.text
    assert reply.headers.get("retry-after"), reply.headers
    error = reply.json()["error"]
    message = error["message"]
    booked = next(w.footprint_gib for w in make_plan(load_spec(swapping.spec)).workers if w.model == "swap-c")
    assert f"model swap-c needs {booked:.2f} GiB on local/gpu0 ({GPU})" in message, message
    assert "GiB free by the plan" in message and "MiB short" in message and "while swap-a is loaded" in message
    assert "weights" in message and "kv cache" in message and "not swappable" in message, message
    assert error["type"] == "server_error"


def test_anthropics_messages_are_held_for_a_swap_and_refused_in_its_shape(swapping: Stack) -> None:
    """/v1/messages passes the coordinator as chat does: a stream waits with comments, then comes whole; a model
    that may not evict is refused in Anthropic's error shape (its SDKs read it)."""
    unload_all(swapping)
    body = {"model": "swap-a", "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with api(swapping) as http, http.stream("POST", "/messages", json=body) as reply:
        assert reply.status_code == 200, reply.read()
        lines = [line for line in reply.iter_lines() if line]
    assert lines[0].startswith(": loading model swap-a"), lines[:3]
    assert "event: message_start" in lines and lines[-2:] == ["event: message_stop", 'data: {"type":"message_stop"}']
    with api(swapping) as http:
        refused = http.post("/messages", json={**body, "model": "swap-c", "stream": False})
    assert refused.status_code == 503, refused.text
    error = refused.json()
    assert error["type"] == "error" and error["error"]["type"] == "overloaded_error", error
    assert "model swap-c needs" in error["error"]["message"] and refused.headers.get("retry-after")


def test_swapped_requests_are_metered(swapping: Stack) -> None:
    unload_all(swapping)
    reply = chat(swapping, "swap-b", max_tokens=5)
    assert reply.status_code == 200
    usage = reply.json()["usage"]
    deadline = time.monotonic() + 15
    while True:
        rows = json.loads(swapping.ctl("usage", "--json").stdout)
        got = [r for r in rows if r.get("model") == "swap-b"]
        if got and sum(int(r.get("completion_tokens", 0)) for r in got) >= usage["completion_tokens"]:
            break
        assert time.monotonic() < deadline, f"swap-b's usage never reached the ledger: {rows}"
        time.sleep(0.5)


def test_controller_load_and_unload_act_through_the_coordinator_and_are_audited(swapping: Stack) -> None:
    """`controller load|unload MODEL`: the console's action from a shell, with the coordinator's refusal as the
    error, each written to the console's audit log under the operator's login name."""
    unload_all(swapping)
    loaded = swapping.ctl("load", "swap-b")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.startswith("swap-b: resident after ") and ", load " in loaded.stdout, loaded.stdout
    assert worker_state(swapping, "swap-b") == "resident"
    unloaded = swapping.ctl("unload", "swap-b", "--json")
    assert unloaded.returncode == 0, unloaded.stderr
    doc = json.loads(unloaded.stdout)
    assert doc["model"] == "swap-b" and doc["action"] == "unload" and doc["state"] == "unloaded", doc
    assert worker_state(swapping, "swap-b") == "unloaded"
    assert swapping.ctl("load", "swap-a").returncode == 0
    refused = swapping.ctl("load", "swap-c")  # not swappable, and swap-a holds the GPU
    assert refused.returncode == 1 and refused.stdout == "", refused
    assert refused.stderr.startswith("error: load swap-c: model swap-c needs ") and "not swappable" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    unknown = swapping.ctl("load", "no-such-model")
    assert unknown.returncode == 1 and "model 'no-such-model' is not on demand; on-demand models: " in unknown.stderr
    audit = [json.loads(line) for line in (swapping.state.gatekeeper / "console-audit.log").read_text().splitlines()]
    done = [(e["action"], e["target"], e["ok"]) for e in audit if e["phase"] == "done" and e["via"] == "controller CLI"]
    assert done[-5:] == [
        ("load", "swap-b", True),
        ("unload", "swap-b", True),
        ("load", "swap-a", True),
        ("load", "swap-c", False),
        ("load", "no-such-model", False),
    ], done
    assert {e["actor"] for e in audit if e["via"] == "controller CLI"} == {getpass.getuser()}
