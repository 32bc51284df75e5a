"""Shared parts of the backend doubles: a threaded HTTP server and OpenAI-shaped answers.

The doubles stand in for programs that cannot run here (vLLM needs a GPU,
Ollama has no installable binary). They follow the documented HTTP APIs and
command lines of the real programs, and answer with fixed text: what is
under test is our adapters and the gateway around them, not generation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlparse

Route = Callable[["Handler"], None]
WORDS = ["double", "says", "hello", "from", "the", "test", "suite"]
# Seconds each generated token takes (default 0: answers at once). Not an option of any real program: generation
# takes time there, and a test that must see requests in flight (vLLM's num_requests_running) sets it on the double.
PACE_ENV = "FLEET_DOUBLE_SECONDS_PER_TOKEN"
# The dimension of the doubles' embeddings (a small model's is a few hundred).
EMBEDDING_DIM = 16


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    routes: ClassVar[dict[tuple[str, str], Route]] = {}

    def log_message(self, *args: object) -> None:
        return

    @property
    def path_only(self) -> str:
        return urlparse(self.path).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlparse(self.path).query)

    def body(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else {}

    def send_json(self, status: int, data: Any) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def send_text(self, status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> None:
        payload = text.encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def send_stream(self, events: Iterator[str], content_type: str = "text/event-stream") -> None:
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for event in events:
            data = event.encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def dispatch(self, method: str) -> None:
        route = self.routes.get((method, self.path_only))
        if route is None:
            self.send_json(404, {"detail": "Not Found"})
            return
        try:
            route(self)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-answer, as clients do

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")

    def do_HEAD(self) -> None:
        self.dispatch("HEAD")


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """An OpenAI `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def serve(host: str, port: int, routes: dict[tuple[str, str], Route]) -> None:
    handler = type("RoutedHandler", (Handler,), {"routes": routes})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.serve_forever()


def completion_words(max_tokens: int | None) -> list[str]:
    count = min(max_tokens or 16, 64)
    return [WORDS[i % len(WORDS)] for i in range(count)]


def seconds_per_token() -> float:
    return float(os.environ.get(PACE_ENV) or 0)


def paced(events: Iterable[str]) -> Iterator[str]:
    """The events of a stream, one token's time (PACE_ENV) before each but the first."""
    delay = seconds_per_token()
    for i, event in enumerate(events):
        if i and delay:
            time.sleep(delay)
        yield event


def generate_for(words: list[str]) -> None:
    """Take the time a non-streamed answer of ``words`` takes (PACE_ENV)."""
    delay = seconds_per_token()
    if delay:
        time.sleep(delay * len(words))


def chat_response(model: str, words: list[str], prompt_tokens: int, owner: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": " ".join(words)}, "finish_reason": "length"}
        ],
        "usage": usage_of(prompt_tokens, len(words)),
        "system_fingerprint": owner,
    }


def event(ident: str, kind: str, created: int, model: str, choices: list[Any], **extra: Any) -> str:
    """One server-sent event of a streamed answer (``kind``: chat.completion.chunk or text_completion)."""
    chunk = {"id": ident, "object": kind, "created": created, "model": model, "choices": choices, **extra}
    return f"data: {json.dumps(chunk)}\n\n"


def chat_stream(model: str, words: list[str], prompt_tokens: int, include_usage: bool) -> Iterator[str]:
    ident, created, kind = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), "chat.completion.chunk"
    for i, word in enumerate(words):
        delta = {"role": "assistant", "content": word} if i == 0 else {"content": " " + word}
        yield event(ident, kind, created, model, [{"index": 0, "delta": delta, "finish_reason": None}])
    yield event(ident, kind, created, model, [{"index": 0, "delta": {}, "finish_reason": "length"}])
    if include_usage:
        yield event(ident, kind, created, model, [], usage=usage_of(prompt_tokens, len(words)))
    yield "data: [DONE]\n\n"


def completion_response(model: str, words: list[str], prompt_tokens: int, owner: str) -> dict[str, Any]:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": " ".join(words), "finish_reason": "length"}],
        "usage": usage_of(prompt_tokens, len(words)),
        "system_fingerprint": owner,
    }


def completion_stream(
    model: str, words: list[str], prompt_tokens: int, include_usage: bool, zero_usage_per_chunk: bool = False
) -> Iterator[str]:
    """`/v1/completions` with `stream: true`: text_completion chunks, the usage chunk (choices empty) when asked,
    then [DONE]. ``zero_usage_per_chunk``: each chunk carries zeroed usage when usage is asked (Ollama does)."""
    ident, created, kind = f"cmpl-{uuid.uuid4().hex}", int(time.time()), "text_completion"
    extra = {"usage": usage_of(0, 0)} if include_usage and zero_usage_per_chunk else {}
    for i, word in enumerate(words):
        finish = "length" if i == len(words) - 1 else None
        text = word if i == 0 else " " + word
        yield event(ident, kind, created, model, [{"index": 0, "text": text, "finish_reason": finish}], **extra)
    if include_usage:
        yield event(ident, kind, created, model, [], usage=usage_of(prompt_tokens, len(words)))
    yield "data: [DONE]\n\n"


def embedding(text: str, dimensions: int = EMBEDDING_DIM) -> list[float]:
    """A fixed unit vector for ``text`` (the same text, the same vector)."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(digest[i % len(digest)] - 127.5) / 127.5 for i in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


def prompt_tokens(body: dict[str, Any]) -> int:
    text = json.dumps(body.get("messages") or body.get("prompt") or "")
    return max(1, len(text) // 4)
