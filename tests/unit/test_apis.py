"""Which API routes each model serves (controller/backends/apis.py), and how a model's task starts its backend."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from controller import backends
from controller.backends import apis
from controller.plan import make_plan
from controller.render import envoy
from controller.spec import load_spec
from tests.helpers import MINIMAL, write_spec

ARCH = {"layers": 2, "kv_heads": 2, "head_dim": 16, "params_b": 0.001}


def fleet(tmp_path: Path, *models: dict[str, Any]) -> Any:
    data = copy.deepcopy(MINIMAL)
    data["hosts"][0]["cpu_workers"] = len(models)
    data["models"] = [{"device": "cpu", "context": 512, "arch": ARCH, **m} for m in models]
    return make_plan(load_spec(write_spec(tmp_path / "fleet.yaml", data)))


LLAMA = {"backend": "llamacpp", "source": {"gguf": "/m/x.gguf"}}
OLLAMA = {"backend": "ollama", "source": {"ollama": "qwen2.5:0.5b"}}
VLLM = {"backend": "vllm", "source": {"huggingface": "org/x"}, "device": "gpu"}


@pytest.mark.parametrize(
    ("model", "container", "local"),
    [
        (
            {**LLAMA, "task": "generate"},
            (apis.CHAT, apis.COMPLETIONS),
            (apis.CHAT, apis.COMPLETIONS, apis.RESPONSES, apis.MESSAGES, apis.COUNT_TOKENS),
        ),
        ({**LLAMA, "task": "embed"}, (apis.EMBEDDINGS,), (apis.EMBEDDINGS,)),
        ({**LLAMA, "task": "rerank"}, (apis.RERANK,), (apis.RERANK,)),
        (
            {**VLLM, "task": "generate"},
            (apis.CHAT, apis.COMPLETIONS, apis.RESPONSES),
            (apis.CHAT, apis.COMPLETIONS, apis.RESPONSES),
        ),
        ({**VLLM, "task": "rerank"}, (apis.RERANK,), (apis.RERANK,)),
        ({**OLLAMA, "task": "generate"}, (apis.CHAT, apis.COMPLETIONS), (apis.CHAT, apis.COMPLETIONS)),
        ({**OLLAMA, "task": "embed"}, (apis.EMBEDDINGS,), (apis.EMBEDDINGS,)),
    ],
    ids=["llamacpp", "llamacpp-embed", "llamacpp-rerank", "vllm", "vllm-rerank", "ollama", "ollama-embed"],
)
def test_each_backend_serves_its_own_routes(
    tmp_path: Path, model: dict[str, Any], container: tuple[str, ...], local: tuple[str, ...]
) -> None:
    spec = fleet(tmp_path, {**model, "name": "x"}).model("x")
    assert apis.served(spec) == container
    assert apis.served(spec, "local") == local


def test_the_lua_filter_is_told_each_models_routes(tmp_path: Path) -> None:
    plan = fleet(tmp_path, {**LLAMA, "name": "chat"}, {**LLAMA, "name": "emb", "task": "embed"})
    container, local = envoy.lua_source(plan), envoy.lua_source(plan, where="local")
    assert '["emb"] = { ["/v1/embeddings"] = true }' in container
    assert '["chat"] = { ["/v1/chat/completions"] = true, ["/v1/completions"] = true }' in container
    assert '["/v1/messages"] = true' in local and '["/v1/messages"] = true' not in container


def test_a_task_starts_the_backend_in_its_mode(tmp_path: Path) -> None:
    plan = fleet(
        tmp_path,
        {**LLAMA, "name": "emb", "task": "embed"},
        {**LLAMA, "name": "rr", "task": "rerank"},
        {**LLAMA, "name": "chat"},
    )
    args = {w.model: backends.get("llamacpp").container_args(w, plan.model(w.model), "/k") for w in plan.workers}
    assert "--embeddings" in args["emb"] and "--reranking" not in args["emb"]
    assert "--reranking" in args["rr"] and "--embeddings" not in args["rr"]
    assert "--embeddings" not in args["chat"] and "--reranking" not in args["chat"]


def test_a_vllm_pooling_model_runs_the_pooling_runner(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"].append({**VLLM, "name": "rr", "task": "rerank", "context": 512, "arch": ARCH})
    plan = make_plan(load_spec(write_spec(tmp_path / "f.yaml", data)))
    vllm = backends.get("vllm")
    (rr,) = plan.workers_of("rr")
    (gen,) = plan.workers_of("m8b")
    rr_args = vllm.container_args(rr, plan.model("rr"), "/k")
    assert rr_args[rr_args.index("--runner") + 1] == "pooling"
    gen_args = vllm.container_args(gen, plan.model("m8b"), "/k")
    assert gen_args[gen_args.index("--runner") + 1] == "generate"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/v1/messages", True),
        ("/v1/messages?beta=true", True),
        ("/v1/messages/count_tokens", True),
        ("/proxy/tiny-local-cpu-1/v1/messages", True),
        ("/v1/chat/completions", False),
        ("/v1/messages/other", False),
        ("/proxy/w/v1/responses", False),
        ("", False),
    ],
)
def test_anthropics_routes_are_known_by_their_uri(uri: str, expected: bool) -> None:
    assert apis.is_anthropic(uri) is expected


def test_a_gatekeeper_refusal_behind_caddy_takes_anthropics_shape_on_its_routes() -> None:
    """Behind Caddy the gatekeeper's answer goes to the client as it is: on /v1/messages in Anthropic's shape, with
    the refusal's status and headers."""
    from controller.gateway.gatekeeper import anthropic_refusal, error

    refused = anthropic_refusal(error(429, "daily token quota used up", "quota_exceeded", headers={"Retry-After": "7"}))
    assert refused.status_code == 429 and refused.headers["retry-after"] == "7"
    assert json.loads(bytes(refused.body)) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "daily token quota used up"},
    }
    assert anthropic_refusal(error(401, "Incorrect API key provided.", "invalid_api_key")).headers["www-authenticate"]
