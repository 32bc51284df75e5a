"""Which API routes each model serves (controller/backends/apis.py), and how a model's task starts its backend."""

from __future__ import annotations

import copy
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
