"""An Ollama double: `ollama serve`, configured by OLLAMA_* variables, with Ollama's HTTP API.

Follows Ollama's documented API: `GET /` ("Ollama is running"),
`/api/version`, `/api/tags`, `POST /api/pull` (NDJSON progress, or one
object with `"stream": false`), `POST /api/copy`, `DELETE /api/delete`,
`GET /api/ps`, `POST /api/generate` with only `model` and `keep_alive` to
load (-1) or unload (0), and the OpenAI-compatible `/v1/models` and
`/v1/chat/completions` (a model that is not present is a 404 "try pulling it
first"). Its "registry" serves any `name[:tag]` made of lower-case letters,
digits and `.-_`. Bound to a loopback address it refuses (403) a `Host` that
is not local, as Ollama does against DNS rebinding (its allowed-hosts check).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import sys
import threading
import time
from typing import Any

from tests.doubles.common import Handler, chat_response, chat_stream, completion_words, prompt_tokens, serve

VERSION = "0.12.6"
PULLABLE = re.compile(r"^[a-z0-9][a-z0-9._-]*(:[a-z0-9._-]+)?$")


def canonical(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.models: dict[str, str] = {}  # name → digest
        self.loaded: set[str] = set()
        self.context = int(os.environ.get("OLLAMA_CONTEXT_LENGTH", "4096"))
        self.parallel = int(os.environ.get("OLLAMA_NUM_PARALLEL", "1"))


def main() -> None:
    if sys.argv[1:] != ["serve"]:
        sys.exit("usage: ollama serve")
    host, _, port = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434").rpartition(":")
    state = State()
    print(
        f"ollama double {VERSION} listening on {host}:{port} ctx={state.context} parallel={state.parallel}", flush=True
    )
    bind = host or "127.0.0.1"
    table = routes(state)
    if _is_loopback(bind):
        table = {key: _local_hosts_only(route) for key, route in table.items()}
    serve(bind, int(port), table)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return address == "localhost"


def allowed_host(header: str) -> bool:
    """Ollama's allowed-hosts check for a server bound to loopback: a local IP or name, else 403."""
    name = header
    if header.startswith("["):
        name = header[1 : header.find("]")]
    elif header.count(":") == 1:
        name = header.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(name)
        return ip.is_loopback or ip.is_private or ip.is_unspecified
    except ValueError:
        pass
    name = name.lower()
    return name in ("", "localhost", socket.gethostname().lower()) or name.endswith(
        (".localhost", ".local", ".internal")
    )


def _local_hosts_only(route: Any) -> Any:
    def checked(h: Handler) -> None:
        if not allowed_host(h.headers.get("host", "")):
            h.send_text(403, "")
            return
        route(h)

    return checked


def routes(state: State) -> dict[tuple[str, str], Any]:
    def root(h: Handler) -> None:
        h.send_text(200, "Ollama is running")

    def version(h: Handler) -> None:
        h.send_json(200, {"version": VERSION})

    def entry(name: str, digest: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "modified_at": "2026-11-01T00:00:00Z",
            "size": 1000,
            "digest": digest,
            "details": {"format": "gguf", "family": "llama", "parameter_size": "1B", "quantization_level": "Q4_K_M"},
        }

    def tags(h: Handler) -> None:
        with state.lock:
            h.send_json(200, {"models": [entry(n, d) for n, d in sorted(state.models.items())]})

    def pull(h: Handler) -> None:
        body = h.body()
        name = str(body.get("model") or body.get("name") or "")
        if not PULLABLE.match(name):
            h.send_json(500, {"error": "pull model manifest: file does not exist"})
            return
        with state.lock:
            state.models[canonical(name)] = f"sha256:{abs(hash(name)):064x}"[:71]
        if body.get("stream") is False:
            h.send_json(200, {"status": "success"})
            return
        steps = ["pulling manifest", "verifying sha256 digest", "writing manifest", "success"]
        h.send_stream((json.dumps({"status": s}) + "\n" for s in steps), "application/x-ndjson")

    def copy(h: Handler) -> None:
        body = h.body()
        source, dest = canonical(str(body.get("source"))), canonical(str(body.get("destination")))
        with state.lock:
            if source not in state.models:
                h.send_json(404, {"error": f"model '{body.get('source')}' not found"})
                return
            state.models[dest] = state.models[source]
        h.send_text(200, "")

    def delete(h: Handler) -> None:
        name = canonical(str(h.body().get("model")))
        with state.lock:
            if state.models.pop(name, None) is None:
                h.send_json(404, {"error": f"model '{name}' not found"})
                return
            state.loaded.discard(name)
        h.send_text(200, "")

    def ps(h: Handler) -> None:
        with state.lock:
            h.send_json(200, {"models": [entry(n, state.models[n]) for n in sorted(state.loaded)]})

    def generate(h: Handler) -> None:
        body = h.body()
        name = canonical(str(body.get("model")))
        with state.lock:
            if name not in state.models:
                h.send_json(404, {"error": f"model '{body.get('model')}' not found, try pulling it first"})
                return
            if body.get("prompt"):
                h.send_json(400, {"error": "the double only loads and unloads"})
                return
            unload = body.get("keep_alive") in (0, "0", "0s")
            (state.loaded.discard if unload else state.loaded.add)(name)
        h.send_json(
            200,
            {
                "model": body.get("model"),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "response": "",
                "done": True,
                "done_reason": "unload" if unload else "load",
            },
        )

    def v1_models(h: Handler) -> None:
        with state.lock:
            data = [
                {
                    "id": n.removesuffix(":latest") if n.endswith(":latest") else n,
                    "object": "model",
                    "created": 0,
                    "owned_by": "library",
                }
                for n in sorted(state.models)
            ]
        h.send_json(200, {"object": "list", "data": data})

    def chat(h: Handler) -> None:
        body = h.body()
        name = canonical(str(body.get("model")))
        with state.lock:
            present = name in state.models
            if present:
                state.loaded.add(name)
        if not present:
            h.send_json(
                404,
                {
                    "error": {
                        "message": f'model "{body.get("model")}" not found, try pulling it first',
                        "type": "api_error",
                        "param": None,
                        "code": None,
                    }
                },
            )
            return
        words = completion_words(body.get("max_tokens") or body.get("max_completion_tokens"))
        tokens = prompt_tokens(body)
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            h.send_stream(chat_stream(str(body["model"]), words, tokens, include))
        else:
            h.send_json(200, chat_response(str(body["model"]), words, tokens, "fp_ollama"))

    return {
        ("GET", "/"): root,
        ("HEAD", "/"): root,
        ("GET", "/api/version"): version,
        ("GET", "/api/tags"): tags,
        ("POST", "/api/pull"): pull,
        ("POST", "/api/copy"): copy,
        ("DELETE", "/api/delete"): delete,
        ("GET", "/api/ps"): ps,
        ("POST", "/api/generate"): generate,
        ("GET", "/v1/models"): v1_models,
        ("POST", "/v1/chat/completions"): chat,
    }


if __name__ == "__main__":
    main()
