"""A vLLM double: `vllm serve MODEL [flags]` with vLLM's OpenAI-compatible server API.

Follows vLLM's documented CLI (the flags the controller renders, refusing
unknown ones as vLLM's argparse does) and HTTP API: `/health`, `/v1/models`
(served names, max_model_len), `/v1/chat/completions` and `/v1/completions`
(with `stream_options.include_usage`), `/metrics` with `vllm:*` series
labelled by `model_name`, and sleep mode (`/sleep`, `/wake_up`,
`/is_sleeping`, with `--enable-sleep-mode`). Like vLLM it exits when
CUDA_VISIBLE_DEVICES names fewer GPUs than the tensor-parallel size. With
`--api-key` or `VLLM_API_KEY` every `/v1` route needs that bearer key.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any

from tests.doubles.common import Handler, chat_response, chat_stream, completion_words, prompt_tokens, serve

# Flags vLLM accepts that specs commonly pass through `options` (bare or with a value).
PASSTHROUGH_BOOL = [
    "--enforce-eager",
    "--trust-remote-code",
    "--enable-prefix-caching",
    "--enable-chunked-prefill",
    "--disable-log-requests",
    "--enable-auto-tool-choice",
]
PASSTHROUGH_VALUE = [
    "--tool-call-parser",
    "--chat-template",
    "--max-num-batched-tokens",
    "--swap-space",
    "--seed",
    "--generation-config",
]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("model")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", nargs="+")
    s.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    s.add_argument("--max-model-len", type=int)
    s.add_argument("--max-num-seqs", type=int, default=256)
    s.add_argument("--tensor-parallel-size", type=int, default=1)
    s.add_argument("--revision")
    s.add_argument("--dtype", choices=["auto", "half", "float16", "bfloat16", "float", "float32"], default="auto")
    s.add_argument("--quantization", choices=["awq", "gptq", "fp8", "bitsandbytes", "gguf"])
    s.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"], default="auto")
    s.add_argument("--enable-sleep-mode", action="store_true")
    s.add_argument("--api-key")  # as vLLM: else VLLM_API_KEY
    for flag in PASSTHROUGH_BOOL:
        s.add_argument(flag, action="store_true")
    for flag in PASSTHROUGH_VALUE:
        s.add_argument(flag)
    return parser.parse_args(argv)


class State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.names = args.served_model_name or [args.model]
        self.sleeping = False
        self.lock = threading.Lock()
        self.running = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests = 0
        self.first_token_s: list[float] = []  # per request, for vllm:time_to_first_token_seconds
        self.e2e_s: list[float] = []  # per request, for vllm:e2e_request_latency_seconds


# vLLM's own bucket bounds for these histograms (seconds).
BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)


def histogram(name: str, label: str, values: list[float]) -> list[str]:
    lines = [f"# TYPE {name} histogram"]
    for bound in BUCKETS:
        lines.append(f'{name}_bucket{{{label},le="{bound}"}} {sum(1 for v in values if v <= bound)}')
    lines.append(f'{name}_bucket{{{label},le="+Inf"}} {len(values)}')
    lines.append(f"{name}_sum{{{label}}} {sum(values)}")
    lines.append(f"{name}_count{{{label}}} {len(values)}")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    if not 0 < args.gpu_memory_utilization <= 1:
        sys.exit(f"ValueError: GPU memory utilization must be within (0, 1]. Got {args.gpu_memory_utilization}.")
    devices = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if len(devices) < args.tensor_parallel_size:
        sys.exit(
            f"RuntimeError: tensor_parallel_size={args.tensor_parallel_size} but only {len(devices)} GPU(s) "
            f"are visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    state = State(args)
    print(f"INFO vllm double: serving {state.names} on {args.host}:{args.port} devices={devices}", flush=True)
    key = args.api_key or os.environ.get("VLLM_API_KEY")
    serve(args.host, args.port, guarded(routes(state), key))


def guarded(table: dict[tuple[str, str], Any], key: str | None) -> dict[tuple[str, str], Any]:
    """vLLM's API-key check (--api-key or VLLM_API_KEY): every /v1 route needs `Authorization: Bearer <key>`,
    else 401 {"error": "Unauthorized"}; /health, /metrics and the rest stay open."""
    if not key:
        return table

    def check(route: Any) -> Any:
        def run(h: Handler) -> None:
            if h.headers.get("authorization") != f"Bearer {key}":
                h.send_json(401, {"error": "Unauthorized"})
                return
            route(h)

        return run

    return {(m, p): check(r) if p.startswith("/v1") else r for (m, p), r in table.items()}


def routes(state: State) -> dict[tuple[str, str], Any]:
    max_len = state.args.max_model_len or 4096

    def health(h: Handler) -> None:
        h.send_text(200, "")

    def models(h: Handler) -> None:
        data = [
            {
                "id": n,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "vllm",
                "root": state.args.model,
                "parent": None,
                "max_model_len": max_len,
            }
            for n in state.names
        ]
        h.send_json(200, {"object": "list", "data": data})

    def generate(h: Handler, chat: bool) -> None:
        body = h.body()
        if body.get("model") not in state.names:
            h.send_json(
                404,
                {
                    "object": "error",
                    "message": f"The model `{body.get('model')}` does not exist.",
                    "type": "NotFoundError",
                    "param": None,
                    "code": 404,
                },
            )
            return
        if state.sleeping:
            h.send_json(
                503,
                {
                    "object": "error",
                    "message": "the engine is sleeping",
                    "type": "ServiceUnavailable",
                    "param": None,
                    "code": 503,
                },
            )
            return
        began = time.monotonic()
        words = completion_words(body.get("max_tokens") or body.get("max_completion_tokens"))
        tokens = prompt_tokens(body)
        with state.lock:
            state.requests += 1
            state.prompt_tokens += tokens
            state.generation_tokens += len(words)
        first = time.monotonic() - began
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            h.send_stream(chat_stream(body["model"], words, tokens, include))
        else:
            reply = chat_response(body["model"], words, tokens, "vllm-double")
            if not chat:
                reply["object"] = "text_completion"
                reply["choices"] = [{"index": 0, "text": " ".join(words), "finish_reason": "length"}]
            h.send_json(200, reply)
        with state.lock:
            state.first_token_s.append(first)
            state.e2e_s.append(time.monotonic() - began)

    def metrics(h: Handler) -> None:
        label = f'model_name="{state.names[0]}"'
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{label}}} {state.running}",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{label}}} 0",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{label}}} 0.0",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{label}}} {state.prompt_tokens}",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{label}}} {state.generation_tokens}",
            "# TYPE vllm:request_success_total counter",
            f'vllm:request_success_total{{finished_reason="length",{label}}} {state.requests}',
            *histogram("vllm:time_to_first_token_seconds", label, state.first_token_s),
            *histogram("vllm:e2e_request_latency_seconds", label, state.e2e_s),
        ]
        h.send_text(200, "\n".join(lines) + "\n", "text/plain; version=0.0.4")

    def set_sleeping(value: bool) -> Any:
        """POST /sleep and /wake_up exist only with --enable-sleep-mode, as in vLLM."""

        def route(h: Handler) -> None:
            if not state.args.enable_sleep_mode:
                h.send_json(404, {"detail": "Not Found"})
                return
            state.sleeping = value
            h.send_text(200, "")

        return route

    def is_sleeping(h: Handler) -> None:
        h.send_json(200, {"is_sleeping": state.sleeping})

    return {
        ("GET", "/health"): health,
        ("GET", "/v1/models"): models,
        ("POST", "/v1/chat/completions"): lambda h: generate(h, chat=True),
        ("POST", "/v1/completions"): lambda h: generate(h, chat=False),
        ("GET", "/metrics"): metrics,
        ("POST", "/sleep"): set_sleeping(True),
        ("POST", "/wake_up"): set_sleeping(False),
        ("GET", "/is_sleeping"): is_sleeping,
    }


if __name__ == "__main__":
    main()
