"""`front: caddy` with an operator's SSO outpost (`gateway.forward_auth`), through the real chain.

Caddy asks the outpost about browsers (no API key), copies the user and groups it names, and the
gatekeeper maps them as it maps SSO logins; API keys still go to the gatekeeper alone. The outpost is a
double of Authelia's forward-auth endpoint (tests/doubles/sso_outpost.py): Authelia has no installable
binary here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.stack import Stack, running_stack
from tests.stubs import free_port, running_process, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("outpost")
    port = free_port()
    outpost = [sys.executable, "-m", "tests.doubles.sso_outpost", "--port", str(port)]
    outpost += ["--session", "tok-alice=alice:kids", "--session", "tok-eve=eve:nobody"]

    def customize(data: dict[str, Any]) -> None:
        data["gateway"]["front"] = "caddy"  # whichever front door this pass of the tier runs
        data["gateway"]["forward_auth"] = {"url": f"http://127.0.0.1:{port}/api/authz/forward-auth"}
        data["groups"] = [{"name": "kids", "models": ["tiny-embed"]}]

    with (
        running_process(outpost, f"http://127.0.0.1:{port}/api/health", tmp / "outpost.log"),
        running_stack(tmp, customize) as running,
    ):
        yield running


def get_models(stack: Stack, headers: dict[str, str]) -> Any:
    with stack.http() as client:
        return client.get(f"{stack.base_url}/models", headers=headers)


def test_the_outposts_user_gets_their_groups_models(stack: Stack) -> None:
    reply = get_models(stack, {"Cookie": "authelia_session=tok-alice"})
    assert reply.status_code == 200, reply.text
    assert [m["id"] for m in reply.json()["data"]] == ["tiny-embed"]
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with stack.http() as client:
        denied = client.post(
            f"{stack.base_url}/chat/completions", json=body, headers={"Cookie": "authelia_session=tok-alice"}
        )
        allowed = client.post(
            f"{stack.base_url}/embeddings",
            json={"model": "tiny-embed", "input": "x"},
            headers={"Cookie": "authelia_session=tok-alice"},
        )
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    assert allowed.status_code == 200
    request_id = allowed.headers["x-request-id"]

    def recorded() -> bool:
        rows = json.loads(stack.ctl("usage", "--json", "--by", "user").stdout)
        return any(r["user"] == "alice" and r["requests"] >= 1 for r in rows)

    wait_until(recorded, 15, f"alice's usage recorded ({request_id})")


def test_no_session_is_the_outposts_refusal_and_claimed_headers_do_nothing(stack: Stack) -> None:
    for headers in (
        {},
        {"Cookie": "authelia_session=forged"},
        {"Remote-User": "alice", "Remote-Groups": "kids"},  # what the outpost would say, sent by the client
        {"X-Fleet-Sso-User": "alice", "X-Fleet-Sso-Groups": "kids", "X-Fleet-Front": "caddy"},
    ):
        reply = get_models(stack, headers)
        assert reply.status_code == 401, (headers, reply.status_code, reply.text)


def test_a_user_the_spec_does_not_know_gets_nothing(stack: Stack) -> None:
    reply = get_models(stack, {"Cookie": "authelia_session=tok-eve"})
    assert reply.status_code == 200 and reply.json()["data"] == []


def test_api_keys_skip_the_outpost(stack: Stack) -> None:
    reply = get_models(stack, {"Authorization": f"Bearer {stack.key}"})
    assert reply.status_code == 200 and len(reply.json()["data"]) == 3
    assert get_models(stack, {"Authorization": "Bearer sk-fleet-nope-nope"}).status_code == 401
