"""`controller up` of a changed spec on a running stack: Envoy reloads its files, only what changed restarts.

One change of each kind at once: a model removed (its worker drained and stopped), a model added (a new
worker; a new cluster and route reach the running Envoy from the files it watches), a user added (the
gatekeeper reloads users from its spec file in place). Meanwhile a stream that began before the change is still being read
and a steady load runs on the model that did not change: the stream finishes whole, no request fails, and
Envoy and that model's workers keep their PIDs.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.stack import LONG_STREAM, running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
STREAM = {**LONG_STREAM, "stream_options": {"include_usage": True}}


def changed_spec(data: dict[str, Any]) -> dict[str, Any]:
    models = [m for m in data["models"] if m["name"] != "tiny-embed"]
    chat = next(m for m in models if m["name"] == "tiny-chat")
    models.append({**chat, "name": "tiny-small", "aliases": [], "replicas": 1, "context": 1024})
    return {**data, "models": models, "users": [*data["users"], {"name": "carol", "models": ["tiny-small"]}]}


def test_a_changed_spec_reloads_without_a_drop(tmp_path: Path) -> None:
    with running_stack(tmp_path) as stack:
        before = stack.processes()
        envoy_pid = before["envoy"]["pid"]
        chat = {n: p["pid"] for n, p in stack.workers("tiny-chat").items()}
        auth = {"Authorization": f"Bearer {stack.key}"}

        failures: list[str] = []
        answered = [0]
        stop = threading.Event()

        def steady() -> None:
            body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            with stack.http() as client:
                while not stop.is_set():
                    try:
                        r = client.post(f"{stack.base_url}/chat/completions", json=body, headers=auth)
                    except httpx.HTTPError as exc:
                        failures.append(f"{type(exc).__name__}: {exc}")
                        continue
                    if r.status_code == 200:
                        answered[0] += 1
                    else:
                        failures.append(f"{r.status_code} {r.text[:200]}")

        load = threading.Thread(target=steady, daemon=True)
        load.start()
        with (
            stack.http() as client,
            client.stream("POST", f"{stack.base_url}/chat/completions", json=STREAM, headers=auth) as stream,
        ):
            assert stream.status_code == 200
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            # The rest stays unread (in Envoy's and the kernel's buffers) while the spec changes under it.
            spec = yaml.safe_load(stack.spec.read_text())
            stack.spec.write_text(yaml.safe_dump(changed_spec(spec), sort_keys=False))
            began = time.monotonic()
            result = stack.ctl("up", str(stack.spec), "--json", "--wait", "120")
            took = time.monotonic() - began
            assert result.returncode == 0, result.stderr
            report = json.loads(result.stdout)
            chunks = [first, *(line for line in lines if line.startswith("data: "))]
        stop.set()
        load.join(timeout=60)

        assert chunks[-1] == "data: [DONE]", chunks[-3:]
        usage = json.loads(chunks[-2].removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] == STREAM["max_tokens"], usage
        assert not failures, (
            f"{len(failures)} failed of {answered[0] + len(failures)} during the reload: {failures[:5]}"
        )
        assert answered[0] > 0

        after = stack.wait_healthy(timeout=60)
        assert after["envoy"]["pid"] == envoy_pid, "Envoy was restarted"
        assert {n: p["pid"] for n, p in stack.workers("tiny-chat").items()} == chat
        assert "tiny-embed-local-cpu-1" not in after and report["stopped"] == ["tiny-embed-local-cpu-1"]
        (small,) = stack.workers("tiny-small")
        assert report["started"] == [small]
        # The gatekeeper reloads users in place; Envoy reads its files: neither restarts.
        assert "gatekeeper" not in report["restarted"] and "envoy" not in report["restarted"]
        assert after["gatekeeper"]["pid"] == before["gatekeeper"]["pid"]
        assert not set(report["restarted"]) & set(chat)
        print(f"reload took {took:.1f}s; {answered[0]} requests answered meanwhile, 0 failed")

        # What the new spec says, served: the new model (through a route and cluster Envoy read from its files),
        # the removed one gone, the new user.
        reply = stack.openai().chat.completions.create(
            model="tiny-small", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content is not None
        created = stack.ctl("keys", "create", "--user", "carol", "--json")
        assert created.returncode == 0, created.stderr
        carol = stack.openai(json.loads(created.stdout)["key"])
        assert [m.id for m in carol.models.list()] == ["tiny-small"]
        with stack.http() as client:
            gone = client.post(f"{stack.base_url}/embeddings", json={"model": "tiny-embed", "input": "x"}, headers=auth)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found", gone.text

        # The same spec again: nothing to do.
        again = json.loads(stack.ctl("up", str(stack.spec), "--json").stdout)
        assert again["already_running"] is True
