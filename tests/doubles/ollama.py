"""An Ollama double: `ollama serve`, configured by OLLAMA_* variables, with Ollama's HTTP API as of the pinned image
(0.12.6).

Follows Ollama's documented API (docs/api.md and the OpenAI-compatibility page, docs/openai.md, now
docs/api/openai-compatibility.mdx, in ollama/ollama) and, where the docs are silent, its source at tag v0.12.6:
- `GET /` ("Ollama is running"), `/api/version`, `/api/tags`, `POST /api/pull` (NDJSON progress, or one object with
  `"stream": false`), `POST /api/copy`, `DELETE /api/delete` (which unloads nothing: server/routes.go DeleteHandler);
- `POST /api/generate`: no prompt loads the model (`done_reason` "load"), no prompt with `keep_alive` 0 unloads it
  (`done_reason` "unload") (docs/api.md "Load a model", "Unload a model"; server/routes.go GenerateHandler); with a
  prompt it generates (NDJSON, or one object with `"stream": false`);
- `keep_alive`: a number of seconds or a Go duration ("5m", "0"); negative is forever; a bare "-1" is not a Go
  duration, a 400 (api/types.go Duration.UnmarshalJSON). A model loaded by a request without one (the OpenAI-compatible
  routes never send one: middleware/openai.go) gets OLLAMA_KEEP_ALIVE (a Go duration or whole seconds; negative is
  forever; unset or unreadable, 5 minutes: envconfig/config.go KeepAlive); a request with one sets its model's, one
  without leaves it as it was (server/sched.go load, useLoadedRunner). A model unloads once its keep_alive has run out
  after its last request; `keep_alive` 0 with no prompt unloads it once its requests in flight are done
  (server/sched.go expireRunner);
- OLLAMA_MAX_LOADED_MODELS: at most that many models loaded at once (0, unset or unreadable: 3 per GPU, 3 without
  one; docs/faq.md, server/sched.go). A request for another model past it unloads one first: an idle one, the one
  with the shortest keep_alive first (then by file), else the busiest's requests are waited for; meanwhile every
  other request waits too (the scheduler takes one pending request at a time). Memory, which real Ollama also
  weighs, is not modelled;
- `GET /api/ps`: one entry per loaded model *file*, named by the name it was first loaded by, so a model and its
  copies share one entry and one unload (server/sched.go keys runners by ModelPath); each with name, model, size,
  digest, details, expires_at, size_vram (0 without a GPU), context_length (api/types.go ProcessModelResponse,
  server/routes.go PsHandler), the latest expiry first;
- a digest is the hex SHA-256 of the model's manifest, the same in /api/tags and /api/ps; a copy has its source's
  (server/images.go GetManifest, CopyModel);
- the OpenAI-compatible `/v1/models` (ids as /api/tags names them, `name:latest`; openai/openai.go ToListCompletion),
  `/v1/chat/completions`, `/v1/completions` (a stream's chunks carry zeroed usage when usage is asked; middleware/
  openai.go CompleteWriter) and `/v1/embeddings` (unit vectors: server/routes.go EmbedHandler normalizes); their
  errors are `{"error": {"message": ..., "type": "api_error", ...}}` with Ollama's status (middleware/openai.go
  writeError), a model that is not present a 404 "model 'x' not found". Each of them loads the model, with the
  default keep_alive.
Its "registry" serves any `name[:tag]` made of lower-case letters, digits and `.-_`. Bound to a loopback address it
refuses (403) a `Host` that is not local, as Ollama does against DNS rebinding (its allowed-hosts check).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import math
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tests.doubles.common import (
    Handler,
    chat_response,
    chat_stream,
    completion_response,
    completion_stream,
    completion_words,
    embedding,
    generate_for,
    paced,
    prompt_tokens,
    serve,
)

VERSION = "0.12.6"
PULLABLE = re.compile(r"^[a-z0-9][a-z0-9._-]*(:[a-z0-9._-]+)?$")
FILE_SIZE = 397_821_319  # bytes of a pulled model (qwen2.5:0.5b's)
KV_BYTES_PER_TOKEN = 12_288  # what a loaded model adds per token of context × parallel
DETAILS = {
    "parent_model": "",
    "format": "gguf",
    "family": "llama",
    "families": ["llama"],
    "parameter_size": "1B",
    "quantization_level": "Q4_K_M",
}
FOREVER = math.inf  # a negative keep_alive: Go's longest duration, about 292 years
GO_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def canonical(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def go_duration(text: str) -> float:
    """Seconds in a Go duration string (time.ParseDuration): "300ms", "1h30m", "0"; a bare number is no duration."""
    body = text[1:] if text[:1] in "+-" else text
    sign = -1.0 if text.startswith("-") else 1.0
    if body == "0":
        return 0.0
    total, at = 0.0, 0
    for part in GO_DURATION_PART.finditer(body):
        if part.start() != at:
            break
        total += float(part.group(1)) * GO_UNITS[part.group(2)]
        at = part.end()
    if not body or at != len(body):
        what = "missing unit in" if re.fullmatch(r"\d+\.?\d*", body) else "invalid"
        raise ValueError(f'time: {what} duration "{text}"')
    return sign * total


def keep_alive(value: Any, default: float) -> float:
    """A request's keep_alive in seconds (FOREVER when negative), as api.Duration reads it; ValueError if invalid."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"Unsupported type: '{type(value).__name__}'")
    seconds = go_duration(value) if isinstance(value, str) else float(value)
    return FOREVER if seconds < 0 else seconds


def default_keep_alive() -> float:
    """OLLAMA_KEEP_ALIVE: a Go duration or whole seconds; negative is forever; unset or unreadable, 5 minutes."""
    raw = os.environ.get("OLLAMA_KEEP_ALIVE", "")
    seconds = 300.0
    try:
        seconds = go_duration(raw)
    except ValueError:
        if re.fullmatch(r"[-+]?\d+", raw):
            seconds = float(int(raw))
    return FOREVER if seconds < 0 else seconds


@dataclass
class Runner:
    """A loaded model file (Ollama's runnerRef)."""

    name: str  # the name it was loaded by
    digest: str
    seconds: float  # its keep_alive
    expires: float  # epoch seconds
    busy: int = 0  # requests using it


def max_loaded_models(gpus: int) -> int:
    """OLLAMA_MAX_LOADED_MODELS as envconfig.Uint reads it; 0 (the default) is 3 per GPU, or 3 without one."""
    raw = os.environ.get("OLLAMA_MAX_LOADED_MODELS", "")
    value = int(raw) if raw.isdigit() else 0
    return value if value > 0 else 3 * max(1, gpus)


class State:
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.models: dict[str, str] = {}  # name:tag → manifest digest
        self.runners: dict[str, Runner] = {}  # digest → the loaded model file
        self.context = int(os.environ.get("OLLAMA_CONTEXT_LENGTH", "4096"))
        self.parallel = int(os.environ.get("OLLAMA_NUM_PARALLEL", "1"))
        self.keep_alive = default_keep_alive()
        gpus = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
        self.gpu = bool(gpus)
        self.max_loaded = max_loaded_models(len(gpus))
        self.scheduling = False  # a request is waiting for a model to unload: the others wait behind it

    def expire(self) -> None:
        now = time.time()
        for digest, runner in list(self.runners.items()):
            if runner.busy <= 0 and runner.expires <= now:
                del self.runners[digest]
                self.lock.notify_all()

    def use(self, name: str, seconds: float | None) -> Runner:
        """Load ``name`` (or take its file's runner) for one request; ``seconds``: the request's keep_alive. Called
        with the lock held; past OLLAMA_MAX_LOADED_MODELS it waits for one to unload first."""
        while self.scheduling:
            self.lock.wait()
        self.expire()
        digest = self.models[name]
        runner = self.runners.get(digest)
        if runner is None and len(self.runners) >= self.max_loaded:
            self.scheduling = True
            try:
                self.evict()
            finally:
                self.scheduling = False
                self.lock.notify_all()
        if runner is None:
            runner = self.runners[digest] = Runner(name, digest, self.keep_alive, 0.0)
        if seconds is not None:
            runner.seconds = seconds
        runner.busy += 1
        runner.expires = time.time() + runner.seconds
        return runner

    def done(self, runner: Runner) -> None:
        """The request ended: its keep_alive runs from now."""
        runner.busy -= 1
        runner.expires = time.time() + runner.seconds
        self.expire()
        self.lock.notify_all()

    def evict(self) -> None:
        """Unload one model to make room (server/sched.go findRunnerToUnload): the first idle one by keep_alive, then
        file; else the first by the same order, once its requests are done."""
        while len(self.runners) >= self.max_loaded:
            ordered = sorted(self.runners.values(), key=lambda r: (r.seconds, r.digest))
            victim = next((r for r in ordered if r.busy <= 0), ordered[0])
            victim.seconds, victim.expires = 0.0, time.time()  # it expires at once, or when its requests are done
            self.expire()
            if victim.digest in self.runners:
                self.lock.wait(1.0)

    def unload(self, digest: str) -> None:
        """`keep_alive` 0 without a prompt: unloaded now, or once its requests in flight are done."""
        runner = self.runners.get(digest)
        if runner is not None:
            runner.seconds, runner.expires = 0.0, time.time()
            self.expire()


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


def expires_at(runner: Runner) -> str:
    """Go's JSON time (RFC 3339); forever is now plus Go's longest duration."""
    seconds = runner.expires - time.time() if math.isfinite(runner.expires) else (2**63 - 1) / 1e9
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return when.isoformat().replace("+00:00", "Z")


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def openai_error(h: Handler, status: int, message: str) -> None:
    """An Ollama error through its OpenAI middleware: the status kept, the body OpenAI-shaped."""
    h.send_json(status, {"error": {"message": message, "type": "api_error", "param": None, "code": None}})


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
            "size": FILE_SIZE,
            "digest": digest,
            "details": DETAILS,
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
            state.models[canonical(name)] = hashlib.sha256(f"manifest of {canonical(name)}".encode()).hexdigest()
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
            state.models[dest] = state.models[source]  # the manifest's bytes, so its digest
        h.send_text(200, "")

    def delete(h: Handler) -> None:
        given = h.body().get("model")
        with state.lock:
            if state.models.pop(canonical(str(given)), None) is None:
                h.send_json(404, {"error": f"model '{given}' not found"})
                return
        h.send_text(200, "")

    def ps(h: Handler) -> None:
        size = FILE_SIZE + KV_BYTES_PER_TOKEN * state.context * state.parallel  # weights and KV cache
        with state.lock:
            state.expire()
            loaded = sorted(state.runners.values(), key=lambda r: r.expires, reverse=True)
            models = [
                {
                    "name": r.name,
                    "model": r.name,
                    "size": size,
                    "digest": r.digest,
                    "details": DETAILS,
                    "expires_at": expires_at(r),
                    "size_vram": size if state.gpu else 0,
                    "context_length": state.context,
                }
                for r in loaded
            ]
        h.send_json(200, {"models": models})

    def generate(h: Handler) -> None:
        body = h.body()
        name = canonical(str(body.get("model")))
        try:
            given = body.get("keep_alive")  # null is as good as absent (a nil pointer in Go)
            seconds = None if given is None else keep_alive(given, state.keep_alive)
        except ValueError as exc:
            h.send_json(400, {"error": str(exc)})
            return
        prompt = str(body.get("prompt") or "")
        with state.lock:
            present = name in state.models
            unload = present and not prompt and seconds == 0
            if unload:
                state.unload(state.models[name])
            runner = state.use(name, seconds) if present and not unload else None
        if not present:
            h.send_json(404, {"error": f"model '{body.get('model')}' not found"})
            return
        if runner is None:
            reply = {"model": body.get("model"), "created_at": now_iso(), "response": "", "done": True}
            h.send_json(200, reply | {"done_reason": "unload"})
            return
        try:
            if not prompt:
                reply = {"model": body.get("model"), "created_at": now_iso(), "response": "", "done": True}
                h.send_json(200, reply | {"done_reason": "load"})
                return
            words = completion_words((body.get("options") or {}).get("num_predict"))
            final = {
                "model": body.get("model"),
                "created_at": now_iso(),
                "response": "",
                "done": True,
                "done_reason": "length",
                "prompt_eval_count": prompt_tokens(body),
                "eval_count": len(words),
            }
            if body.get("stream") is False:
                generate_for(words)
                h.send_json(200, final | {"response": " ".join(words)})
                return
            h.send_stream(paced(ndjson(body, words, final)), "application/x-ndjson")
        finally:
            with state.lock:
                state.done(runner)

    def ndjson(body: dict[str, Any], words: list[str], final: dict[str, Any]) -> Iterator[str]:
        for i, word in enumerate(words):
            chunk = {"model": body.get("model"), "created_at": now_iso(), "response": word if i == 0 else " " + word}
            yield json.dumps(chunk | {"done": False}) + "\n"
        yield json.dumps(final) + "\n"

    def v1_models(h: Handler) -> None:
        with state.lock:
            data = [
                {"id": n, "object": "model", "created": 1793491200, "owned_by": "library"} for n in sorted(state.models)
            ]
        h.send_json(200, {"object": "list", "data": data})

    def openai(h: Handler, kind: str) -> None:
        body = h.body()
        name = canonical(str(body.get("model")))
        with state.lock:
            runner = state.use(name, None) if name in state.models else None
        if runner is None:
            openai_error(h, 404, f"model '{body.get('model')}' not found")
            return
        try:
            if kind == "embeddings":
                embeddings(h, body)
            else:
                complete(h, body, kind == "chat")
        finally:
            with state.lock:
                state.done(runner)

    def complete(h: Handler, body: dict[str, Any], chat: bool) -> None:
        model = str(body["model"])
        words = completion_words(body.get("max_tokens") or body.get("max_completion_tokens"))
        tokens = prompt_tokens(body)
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            if chat:
                h.send_stream(paced(chat_stream(model, words, tokens, include)))
            else:
                h.send_stream(paced(completion_stream(model, words, tokens, include, zero_usage_per_chunk=True)))
            return
        generate_for(words)
        h.send_json(200, (chat_response if chat else completion_response)(model, words, tokens, "fp_ollama"))

    def embeddings(h: Handler, body: dict[str, Any]) -> None:
        inputs = body.get("input")
        if inputs == "":
            inputs = [""]  # middleware/openai.go EmbeddingsMiddleware
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            h.send_json(
                400,
                {"error": {"message": "invalid input", "type": "invalid_request_error", "param": None, "code": None}},
            )
            return
        dimensions = int(body.get("dimensions") or 0)
        vectors = [embedding(text) for text in inputs]
        if 0 < dimensions < len(vectors[0]):  # cut, then normalized again
            vectors = [[x / math.sqrt(sum(y * y for y in v[:dimensions])) for x in v[:dimensions]] for v in vectors]
        tokens = sum(max(1, len(text) // 4) for text in inputs)
        data = [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        h.send_json(200, {"object": "list", "data": data, "model": body.get("model"), "usage": usage})

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
        ("POST", "/v1/chat/completions"): lambda h: openai(h, "chat"),
        ("POST", "/v1/completions"): lambda h: openai(h, "completions"),
        ("POST", "/v1/embeddings"): lambda h: openai(h, "embeddings"),
    }


if __name__ == "__main__":
    main()
