"""A vLLM double: `vllm serve MODEL [flags]` with vLLM's OpenAI-compatible server, as of the pinned image (0.11.0).

Follows vLLM's CLI (the flags the controller renders, refusing unknown ones as vLLM's argparse does) and HTTP API:
`/health`, `/v1/models` (served names, max_model_len), `/v1/chat/completions` and `/v1/completions` (with
`stream_options.include_usage`), `/metrics` with `vllm:*` series labelled by `model_name` and `engine`, where
`vllm:num_requests_running` counts the requests being served (at most `--max-num-seqs`) and
`vllm:num_requests_waiting` the ones queued behind them. Like vLLM it exits when CUDA_VISIBLE_DEVICES names fewer
GPUs than the tensor-parallel size. With `--api-key` or `VLLM_API_KEY` every `/v1` route needs that bearer key.

Runners and the APIs they serve, as vLLM 0.11.0 has them (the wheel's vllm/entrypoints/openai/api_server.py,
protocol.py, serving_engine.py, serving_responses.py, serving_score.py, serving_embedding.py; vllm/config/model.py):
- `--runner` takes auto, draft, generate or pooling (model.py RunnerOption; arg_utils.py hands argparse the sorted
  choices, so any other value is an argparse error). `auto` resolves by the model's architecture, which the double
  does not read: it counts as generate. A draft runner serves no task (vllm/v1/worker/gpu_model_runner.py,
  get_supported_tasks). Which pooling tasks a pooling model has depends on the model (an embedding model: embed; a
  cross-encoder: score); the double's pooling model has both;
- every route exists whatever the runner (one static router). Where the runner has no handler for it
  (init_app_state builds chat, completions and responses only for the generate task, embeddings for embed, rerank
  for embed or score), the route returns `create_error_response(message="The model does not support Chat
  Completions API")` (Completions, Responses, Embeddings, "Rerank (Score)") itself: an ErrorResponse
  `{"error": {"message", "type": "BadRequestError", "param": null, "code": 400}}` that FastAPI sends with HTTP
  status 200, as a returned model goes out (vllm-project/vllm issue #21704). Errors a handler returns (an unknown
  model: 404 NotFoundError) go out with their code as status; a body that fails validation is a 400 "Bad Request";
- `POST /v1/responses` (generate), as serving_responses.py answers a model without Harmony (no gpt-oss): `input` a
  string (a user message) or a list of messages, `instructions` a system message before it; `model` may be left out
  (then the served one); the answer names the first served name, as vLLM does. `max_output_tokens` bounds the words
  like max_tokens; the response's `max_output_tokens` is min(it, max_model_len - prompt tokens), or the latter when
  not given. Status is always "completed" (vLLM sets another only with Harmony); usage has `input_tokens_details`
  (cached_tokens 0) and `output_tokens_details` (reasoning_tokens, tool_output_tokens 0). Nothing is stored
  (VLLM_ENABLE_RESPONSES_API_STORE is not followed): `background` is refused (400 invalid_request_error),
  `previous_response_id` is not found (404), and `tools` are refused (400, "Tool use is not supported in Responses
  API without Harmony None"). With `stream: true`: `event: <type>` / `data: <json>` pairs numbered by
  `sequence_number` from 0 and no `[DONE]`: response.created and response.in_progress (the response in progress,
  output empty, usage null), response.output_item.added, response.content_part.added, one response.output_text.delta
  per word, response.output_text.done, response.content_part.done, response.output_item.done, response.completed
  (the whole response with usage). Kept as 0.11.0 sends them: the streamed item's id is a bare uuid4 while the
  completed response's message has a `msg_` id of its own; `content_index` is 0 on content_part.added and then goes
  up by one with every event (the deltas 1, 2, ...), so the openai SDK's `responses.stream()` accumulator, which
  indexes the part by it, fails on it (vllm-project/vllm issue #45742 is that bug in the Harmony path);
  `responses.create(stream=True)` reads it;
- `POST /rerank`, `/v1/rerank`, `/v2/rerank` (embed or score; the Jina/Cohere shape, serving_score.py do_rerank):
  `query` a string, `documents` a list of strings (no multi-modal input), `top_n` (0 or absent: all). Results
  `{"index", "document": {"text", "multi_modal": null}, "relevance_score"}` sorted by score, highest first, then cut to
  top_n; `usage` is RerankUsage, only `total_tokens`: the prompt tokens of every pair scored, the query's counted
  with each document; id `rerank-<X-Request-Id or a uuid>`. An empty `documents` is a 400 ("At least one text_pair
  element must be given"). /rerank and /v2/rerank are outside /v1, so the API key does not guard them
  (AuthenticationMiddleware). The double's score is the share of the query's words found in the document;
- `POST /v1/embeddings` (embed): `input` a string, strings, token ids or lists of them; `encoding_format` float or
  base64 (float32 bytes); the double's unit vectors (tests/doubles/common.py, EMBEDDING_DIM); usage
  `{"prompt_tokens", "total_tokens", "completion_tokens": 0, "prompt_tokens_details": null}`; `dimensions` is
  refused as by a model without matryoshka representation (pooling_params.py).
A pooling request takes one of the --max-num-seqs places while served and adds its prompt tokens to
`vllm:prompt_tokens_total`; responses count like chat completions.

`--speculative-config` is a JSON object, as vLLM 0.11.0 reads it (vllm/engine/arg_utils.py: `optional_type(json.loads)`,
so a value that is no JSON is an argparse error), then checked as vllm/config/speculative.py's SpeculativeConfig
checks it at start, exiting with its error: an unknown key (a TypeError of the dataclass), an unknown method;
`num_speculative_tokens` without a model unless the method is ngram or mtp (ValueError); ngram's prompt_lookup_min/max
(both default to the other, 5 when neither is given; each > 0, min <= max); and a draft model that is no EAGLE head
(by name: `eagle-`, `eagle3`) is refused: "Speculative decoding with draft model is not supported yet" (a
NotImplementedError: vLLM 0.11's V1 engine has no draft-model speculation). `num_speculative_tokens` must then be
given and > 0. Whether a model really has MTP layers (method mtp) needs its config, which the double does not read.

Sleep mode, as vLLM 0.11.0 has it (the `vllm` 0.11.0 wheel on PyPI, the source of the v0.11.0 tag):
- the routes `POST /sleep?level=N`, `POST /wake_up[?tags=T...]`, `GET /is_sleeping` and `POST /collective_rpc` exist
  only when `VLLM_SERVER_DEV_MODE` is a non-zero integer (vllm/entrypoints/openai/api_server.py: they are defined
  under `if envs.VLLM_SERVER_DEV_MODE:`; vllm/envs.py reads it as `bool(int(...))`, so "true" is a ValueError at
  start); otherwise they are 404 like any unknown route. They are not behind the API key, which guards only paths
  under /v1 (api_server.py, AuthenticationMiddleware);
- `/sleep` answers 200 with no body; level 1 offloads the weights to CPU memory and discards the KV cache, any other
  level discards both (vllm/v1/worker/gpu_worker.py: `offload_tags=("weights",) if level == 1 else tuple()`), so after
  a level-2 sleep the woken model answers garbage until `POST /collective_rpc {"method": "reload_weights"}`. A
  second `/sleep` while sleeping does nothing, whatever its level (vllm/executor/executor_base.py);
- `/wake_up` wakes every tag, or only those named (`weights`, `kv_cache`); a tag that is not asleep makes it do
  nothing; `is_sleeping` stays true until every tag is awake (executor_base.py);
- without `--enable-sleep-mode` the weights and KV cache were never allocated in the sleep-mode pool, so `/sleep`
  still answers 200 and `is_sleeping` turns true, but nothing is released and the model keeps answering
  (vllm/device_allocator/cumem.py: sleep releases only what the pool allocated);
- with `--enable-sleep-mode`, serving while asleep touches released memory: the engine dies with a CUDA illegal
  memory access, the request gets a 500 and the server exits (vllm/entrypoints/launcher.py, terminate_if_errored;
  vllm-project/vllm issues #15483, #28714, #45520). That holds for a request that arrives while asleep and for
  requests still in flight when `/sleep` comes: drain first.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import re
import struct
import sys
import threading
import time
import uuid
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


# vllm/config/speculative.py (0.11.0): SpeculativeConfig's fields a user may give, its methods, the MTP model types.
SPECULATIVE_FIELDS = {
    "enforce_eager",
    "num_speculative_tokens",
    "model",
    "method",
    "draft_tensor_parallel_size",
    "disable_logprobs",
    "quantization",
    "max_model_len",
    "revision",
    "code_revision",
    "disable_by_batch_size",
    "disable_padded_drafter_batch",
    "prompt_lookup_max",
    "prompt_lookup_min",
    "speculative_token_tree",
}
MTP_MODEL_TYPES = ("deepseek_mtp", "mimo_mtp", "glm4_moe_mtp", "ernie_mtp", "qwen3_next_mtp", "longcat_flash_mtp")
SPECULATIVE_METHODS = {"ngram", "eagle", "eagle3", "medusa", "mlp_speculator", "draft_model", "mtp", *MTP_MODEL_TYPES}


# What each runner serves (vllm/v1/worker/gpu_model_runner.py, get_supported_tasks): the generation tasks, the
# pooling tasks, or nothing (a draft runner). `auto` resolves by the model's architecture, which the double does not
# read: it counts as generate. Which pooling tasks a model has depends on it too (an embedding model: embed; a
# cross-encoder: score and classify); the double's pooling model has both embed and score.
RUNNER_TASKS: dict[str, frozenset[str]] = {
    "auto": frozenset({"generate"}),
    "draft": frozenset(),
    "generate": frozenset({"generate"}),
    "pooling": frozenset({"embed", "score"}),
}


def json_value(value: str) -> Any:
    """vLLM's `optional_type(json.loads)`: "" and "None" are None; anything else must be JSON."""
    if value in ("", "None"):
        return None
    try:
        return json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"Value {value} cannot be converted to {json.loads}.") from exc


def speculative_error(config: Any) -> str | None:
    """What SpeculativeConfig(**config) raises at start (see the module's docstring), or None."""
    if not isinstance(config, dict):
        return f"TypeError: vllm.config.speculative.SpeculativeConfig() argument after ** must be a mapping, not {type(config).__name__}"
    unknown = sorted(set(config) - SPECULATIVE_FIELDS)
    if unknown:
        return f"TypeError: SpeculativeConfig.__init__() got an unexpected keyword argument '{unknown[0]}'"
    method, model, tokens = config.get("method"), config.get("model"), config.get("num_speculative_tokens")
    if method is not None and method not in SPECULATIVE_METHODS and method != "[ngram]":
        return f"pydantic_core.ValidationError: method: Input should be one of {sorted(SPECULATIVE_METHODS)} [input_value={method!r}]"
    if method in MTP_MODEL_TYPES:
        method = "mtp"  # "deprecated and replaced with mtp"
    if model is None and tokens is not None:
        if method == "mtp":
            model = "the target model"  # its own MTP layers
        elif method in ("ngram", "[ngram]"):
            model = "ngram"
        else:
            return "ValueError: num_speculative_tokens was provided but without speculative model."
    if method is None and model in ("ngram", "[ngram]"):
        method = "ngram"
    if method in ("ngram", "[ngram]"):
        given_low, given_high = config.get("prompt_lookup_min"), config.get("prompt_lookup_max")
        if given_low is None and given_high is None:
            given_low = given_high = 5
        low = given_high if given_low is None else given_low
        high = low if given_high is None else given_high
        if not isinstance(low, int) or not isinstance(high, int):
            return (
                f"pydantic_core.ValidationError: prompt_lookup_min/max: Input should be a valid integer ({low}, {high})"
            )
        if low < 1:
            return f"ValueError: prompt_lookup_min={low} must be > 0"
        if high < 1:
            return f"ValueError: prompt_lookup_max={high} must be > 0"
        if low > high:
            return f"ValueError: prompt_lookup_min={low} must be <= prompt_lookup_max={high}"
    elif model is not None and method != "mtp":
        eagle = method in ("eagle", "eagle3") or "eagle-" in str(model).lower() or "eagle3" in str(model).lower()
        if not eagle:
            return (
                "NotImplementedError: Speculative decoding with draft model is not supported yet. Please consider "
                "using other speculative decoding methods such as ngram, medusa, eagle, or mtp."
            )
    if tokens is None:
        return (
            "ValueError: num_speculative_tokens must be provided with speculative model unless the draft model "
            "config contains an n_predict parameter."
        )
    if not isinstance(tokens, int) or tokens <= 0:
        return f"ValueError: Expected num_speculative_tokens to be greater than zero ({tokens})."
    return None


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
    s.add_argument("--speculative-config", type=json_value)
    s.add_argument("--hf-overrides", type=json_value)  # a JSON object merged into the model's config
    s.add_argument("--api-key")  # as vLLM: else VLLM_API_KEY
    # vllm/config/model.py RunnerOption; arg_utils.py literal_to_kwargs gives argparse the sorted choices.
    s.add_argument("--runner", type=str, choices=sorted(RUNNER_TASKS), default="auto")
    for flag in PASSTHROUGH_BOOL:
        s.add_argument(flag, action="store_true")
    for flag in PASSTHROUGH_VALUE:
        s.add_argument(flag)
    return parser.parse_args(argv)


class State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.names = args.served_model_name or [args.model]
        self.tasks = RUNNER_TASKS[args.runner]
        self.lock = threading.Condition()
        self.sleeping_tags: set[str] = set()  # what is asleep: empty (awake), or of {"weights", "kv_cache"}
        self.weights_lost = False  # after a level-2 sleep (sleep mode on), until reload_weights
        self.dead = False  # the engine died (see die)
        self.running = 0  # requests being served, at most --max-num-seqs
        self.waiting = 0  # requests queued behind them
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests = 0
        self.first_token_s: list[float] = []  # per request, for vllm:time_to_first_token_seconds
        self.e2e_s: list[float] = []  # per request, for vllm:e2e_request_latency_seconds

    @property
    def released(self) -> bool:
        """Whether sleeping released GPU memory: only memory of the sleep-mode pool is released."""
        return bool(self.sleeping_tags) and self.args.enable_sleep_mode

    def admit(self) -> None:
        """Wait for one of --max-num-seqs places, counted as waiting meanwhile (vLLM's scheduler)."""
        with self.lock:
            self.waiting += 1
            while self.running >= self.args.max_num_seqs:
                self.lock.wait()
            self.waiting -= 1
            self.running += 1

    def release(self) -> None:
        with self.lock:
            self.running -= 1
            self.lock.notify()


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
    if args.speculative_config is not None:
        error = speculative_error(args.speculative_config)
        if error:
            sys.exit(error)
    raw = os.environ.get("VLLM_SERVER_DEV_MODE", "0")
    try:
        dev_mode = bool(int(raw))  # as vllm/envs.py reads it
    except ValueError:
        sys.exit(f"ValueError: invalid literal for int() with base 10: {raw!r}")
    state = State(args)
    print(f"INFO vllm double: serving {state.names} on {args.host}:{args.port} devices={devices}", flush=True)
    if dev_mode:
        print("WARNING SECURITY WARNING: Development endpoints are enabled! This should NOT be used in production!")
    key = args.api_key or os.environ.get("VLLM_API_KEY")
    table = routes(state)
    if dev_mode:
        table |= dev_routes(state)
    serve(args.host, args.port, guarded(table, key))


def die(state: State, why: str) -> None:
    """The engine dies: what vLLM does on a CUDA error in its engine core. The server exits shortly after, once the
    answer in hand is sent (launcher.py: terminate_if_errored)."""
    state.dead = True
    print(f"ERROR vllm double: EngineCore encountered a fatal error: {why}", flush=True)
    threading.Timer(0.2, os._exit, args=(1,)).start()


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
        h.send_text(500 if state.dead else 200, "")

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

    def not_found(h: Handler, model: Any) -> None:
        message = f"The model `{model}` does not exist."  # serving_engine.py, _check_model
        h.send_json(404, error_body(message, "NotFoundError", 404))

    def engine_down(h: Handler) -> bool:
        """Whether the engine cannot serve (dead, or asleep with its memory released); then it has answered 500."""
        if state.dead or state.released:
            if not state.dead:
                die(state, "a request while asleep: CUDA error: an illegal memory access was encountered")
            h.send_text(500, "")
            return True
        return False

    def count(tokens: int, generated: int) -> None:
        with state.lock:
            state.requests += 1
            state.prompt_tokens += tokens
            state.generation_tokens += generated

    def words_for(max_tokens: Any) -> list[str]:
        words = completion_words(max_tokens)
        if state.weights_lost:
            words = ["!"] * len(words)  # the woken weights are whatever the new memory holds
        return words

    def generate(h: Handler, chat: bool) -> None:
        body = h.body()
        if "generate" not in state.tasks:
            unsupported(h, "Chat Completions" if chat else "Completions")
            return
        if body.get("model") not in state.names:
            not_found(h, body.get("model"))
            return
        if engine_down(h):
            return
        words = words_for(body.get("max_tokens") or body.get("max_completion_tokens"))
        tokens = prompt_tokens(body)
        state.admit()
        try:
            count(tokens, len(words))
            answer(h, body, chat, words, tokens)
        finally:
            state.release()

    def answer(h: Handler, body: dict[str, Any], chat: bool, words: list[str], tokens: int) -> None:
        """Send the answer, one token's time per word (tests/doubles/common.py, PACE_ENV); record its timings."""
        began = time.monotonic()
        model = str(body["model"])
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            events = (chat_stream if chat else completion_stream)(model, words, tokens, include)
            first: list[float] = []

            def timed(event: str) -> str:
                if not first:
                    first.append(time.monotonic() - began)
                return event

            h.send_stream(timed(e) for e in paced(events))
            ttft = first[0] if first else 0.0
        else:
            generate_for(words)
            h.send_json(200, (chat_response if chat else completion_response)(model, words, tokens, "vllm-double"))
            ttft = time.monotonic() - began
        timings(began, ttft)

    def timings(began: float, ttft: float) -> None:
        with state.lock:
            state.first_token_s.append(ttft)
            state.e2e_s.append(time.monotonic() - began)

    def responses(h: Handler) -> None:
        """`POST /v1/responses`, as serving_responses.py answers a model without Harmony (see the module's docstring)."""
        body = h.body()
        problem = responses_invalid(body)
        if problem:
            h.send_json(400, error_body(problem, "Bad Request", 400))  # api_server.py, validation_exception_handler
            return
        if "generate" not in state.tasks:
            unsupported(h, "Responses")
            return
        if body.get("model") and body["model"] not in state.names:
            not_found(h, body["model"])
            return
        if engine_down(h):
            return
        refusal = responses_refusal(body)
        if refusal:
            h.send_json(refusal[0], refusal[1])
            return
        words = words_for(body.get("max_output_tokens"))
        tokens = prompt_tokens({"messages": response_messages(body)})
        given = body.get("max_output_tokens")
        room = max_len - tokens  # serving_responses.py: default_max_tokens = max_model_len - prompt tokens
        settings = dict(body, max_output_tokens=room if given is None else min(given, room))
        state.admit()
        try:
            count(tokens, len(words))
            began, created = time.monotonic(), int(time.time())
            final = response_object(settings, state.names[0], created, words, tokens)
            if body.get("stream"):
                head, deltas, tail = response_events(final)
                first: list[float] = []

                def timed(event: str) -> str:
                    if not first:
                        first.append(time.monotonic() - began)
                    return event

                h.send_stream(itertools.chain(head, (timed(e) for e in paced(deltas)), tail))
                ttft = first[0] if first else 0.0
            else:
                generate_for(words)
                h.send_json(200, final)
                ttft = time.monotonic() - began
            timings(began, ttft)
        finally:
            state.release()

    def pooled(h: Handler, tokens: int, answer: dict[str, Any]) -> None:
        """Serve a pooling request: it takes one of --max-num-seqs places, its prompt tokens are counted."""
        state.admit()
        try:
            with state.lock:
                state.prompt_tokens += tokens
            h.send_json(200, answer)
        finally:
            state.release()

    def rerank(h: Handler) -> None:
        """`POST /rerank`, `/v1/rerank`, `/v2/rerank` (serving_score.py, do_rerank; see the module's docstring)."""
        body = h.body()
        query, documents, top_n = body.get("query"), body.get("documents"), body.get("top_n", 0)
        if not isinstance(query, str) or not isinstance(documents, list) or not isinstance(top_n, int):
            h.send_json(
                400,
                error_body(
                    "RerankRequest: query (a string), documents (a list) and top_n (an integer)", "Bad Request", 400
                ),
            )
            return
        if not all(isinstance(d, str) for d in documents):
            h.send_json(400, error_body("RerankRequest: documents: a list of strings", "Bad Request", 400))
            return
        if not state.tasks & {"embed", "score"}:  # api_server.py: openai_serving_scores needs embed or score
            unsupported(h, "Rerank (Score)")
            return
        if body.get("model") and body["model"] not in state.names:
            not_found(h, body["model"])
            return
        if not documents:  # score_utils.py, _validate_score_input_lens; do_rerank answers a ValueError with 400
            h.send_json(400, error_body("At least one text_pair element must be given", "BadRequestError", 400))
            return
        if engine_down(h):
            return
        scores = [overlap(query, d) for d in documents]
        order = sorted(range(len(documents)), key=lambda i: scores[i], reverse=True)  # stable, as list.sort
        results = [
            {"index": i, "document": {"text": documents[i], "multi_modal": None}, "relevance_score": scores[i]}
            for i in order
        ]
        if 0 < top_n < len(documents):
            results = results[:top_n]
        # Each scored pair is one prompt: the query with the document (score_utils.py, _cosine_similarity).
        tokens = sum(prompt_tokens({"prompt": query}) + prompt_tokens({"prompt": d}) for d in documents)
        ident = h.headers.get("x-request-id") or uuid.uuid4().hex
        answer = {
            "id": f"rerank-{ident}",
            "model": state.names[0],
            "usage": {"total_tokens": tokens},
            "results": results,
        }
        pooled(h, tokens, answer)

    def embeddings(h: Handler) -> None:
        """`POST /v1/embeddings` (serving_embedding.py; see the module's docstring)."""
        body = h.body()
        inputs = embedding_inputs(body.get("input"))
        encoding = body.get("encoding_format", "float")
        if inputs is None or encoding not in ("float", "base64"):
            message = (
                "EmbeddingRequest: input (a string, a list of strings or token ids), encoding_format float or base64"
            )
            h.send_json(400, error_body(message, "Bad Request", 400))
            return
        if "embed" not in state.tasks:
            unsupported(h, "Embeddings")
            return
        if body.get("model") and body["model"] not in state.names:
            not_found(h, body["model"])
            return
        if body.get("dimensions") is not None:  # pooling_params.py, verify: the double's model is no matryoshka one
            message = (
                f'Model "{state.names[0]}" does not support matryoshka representation, '
                "changing output dimensions will lead to poor results."
            )
            h.send_json(400, error_body(message, "BadRequestError", 400))
            return
        if engine_down(h):
            return
        data, tokens = [], 0
        for i, item in enumerate(inputs):
            vector = embedding(item if isinstance(item, str) else json.dumps(item))
            tokens += prompt_tokens({"prompt": item}) if isinstance(item, str) else len(item)
            value: Any = vector
            if encoding == "base64":  # float32 bytes, as serving_embedding.py's _get_embedding
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"index": i, "object": "embedding", "embedding": value})
        ident = h.headers.get("x-request-id") or body.get("request_id") or uuid.uuid4().hex
        usage = {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "prompt_tokens_details": None}
        answer = {
            "id": f"embd-{ident}",
            "object": "list",
            "created": int(time.time()),
            "model": state.names[0],
            "data": data,
            "usage": usage,
        }
        pooled(h, tokens, answer)

    def metrics(h: Handler) -> None:
        label = f'model_name="{state.names[0]}",engine="0"'  # vllm/v1/metrics/loggers.py: labelnames
        with state.lock:
            running, waiting = state.running, state.waiting
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{label}}} {running}",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{label}}} {waiting}",
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

    return {
        ("GET", "/health"): health,
        ("GET", "/v1/models"): models,
        ("POST", "/v1/chat/completions"): lambda h: generate(h, chat=True),
        ("POST", "/v1/completions"): lambda h: generate(h, chat=False),
        ("POST", "/v1/responses"): responses,
        ("POST", "/v1/embeddings"): embeddings,
        ("POST", "/rerank"): rerank,
        ("POST", "/v1/rerank"): rerank,
        ("POST", "/v2/rerank"): rerank,
        ("GET", "/metrics"): metrics,
    }


def error_body(message: str, kind: str, code: int) -> dict[str, Any]:
    """vLLM's ErrorResponse (vllm/entrypoints/openai/protocol.py: ErrorInfo message, type, param, code)."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def unsupported(h: Handler, api: str) -> None:
    """A route whose handler this runner lacks: api_server.py returns `create_error_response(...)`, an ErrorResponse
    with code 400, from the route itself, and FastAPI sends what a route returns with status 200."""
    h.send_json(200, error_body(f"The model does not support {api} API", "BadRequestError", 400))


def responses_invalid(body: Any) -> str | None:
    """What ResponsesRequest's validation refuses (a 400 before any handler), of what the double reads."""
    if not isinstance(body, dict) or not isinstance(body.get("input"), str | list):
        return "ResponsesRequest: input: a string or a list of input items is required"
    if body.get("background") and body.get("store") is False:
        return "Value error, background can only be used when `store` is true"
    if body.get("prompt") is not None:
        return "Value error, prompt template is not supported"
    return None


def responses_refusal(body: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """What serving_responses.py's create_responses refuses, without VLLM_ENABLE_RESPONSES_API_STORE (store off)."""
    if body.get("background"):
        message = (
            "This vLLM engine does not support `store=True` and therefore does not support the background mode. To "
            "enable these features, set the environment variable `VLLM_ENABLE_RESPONSES_API_STORE=1` when launching "
            "the vLLM server."
        )
        return 400, error_body(message, "invalid_request_error", 400)
    if body.get("previous_response_id") is not None:  # nothing is stored
        message = f"Response with id '{body['previous_response_id']}' not found."
        return 404, error_body(message, "invalid_request_error", 404)
    if body.get("tools"):  # _make_request: a NotImplementedError, answered as f"{e} {e.__cause__}"
        return 400, error_body(
            "Tool use is not supported in Responses API without Harmony None", "BadRequestError", 400
        )
    return None


def response_messages(body: dict[str, Any]) -> list[Any]:
    """serving_responses.py, _construct_input_messages: instructions as a system message, then the input."""
    messages: list[Any] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    if isinstance(body["input"], str):
        messages.append({"role": "user", "content": body["input"]})
    else:
        messages.extend(body["input"])
    return messages


def response_object(body: dict[str, Any], model: str, created: int, words: list[str], tokens: int) -> dict[str, Any]:
    """ResponsesResponse.from_request (protocol.py), completed with the answer ``words``. Temperature and top_p
    default to 1.0 (vLLM takes the model's generation config first, which the double does not read)."""
    text: dict[str, Any] = {"type": "output_text", "text": " ".join(words), "annotations": [], "logprobs": None}
    message = {"id": f"msg_{uuid.uuid4().hex}", "content": [text], "role": "assistant", "status": "completed"}
    usage = {
        "input_tokens": tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": len(words),
        "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0},
        "total_tokens": tokens + len(words),
    }
    return {
        "id": body.get("request_id") or f"resp_{uuid.uuid4().hex}",
        "created_at": created,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "metadata": body.get("metadata"),
        "model": model,
        "object": "response",
        "output": [dict(message, type="message")],
        "input_messages": None,
        "output_messages": None,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "temperature": 1.0 if body.get("temperature") is None else body["temperature"],
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": 1.0 if body.get("top_p") is None else body["top_p"],
        "background": bool(body.get("background")),
        "max_output_tokens": body["max_output_tokens"],
        "max_tool_calls": body.get("max_tool_calls"),
        "previous_response_id": body.get("previous_response_id"),
        "prompt": None,
        "reasoning": body.get("reasoning"),
        "service_tier": body.get("service_tier", "auto"),
        "status": "completed",
        "text": body.get("text"),
        "top_logprobs": None,
        "truncation": body.get("truncation", "disabled"),
        "usage": usage,
        "user": body.get("user"),
    }


def response_events(final: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """The server-sent events of a streamed response (serving_responses.py: responses_stream_generator and
    _process_simple_streaming_events), split as: those before the first token, one text delta per word, the rest.
    Kept as vLLM 0.11.0 sends them: the item's id in the stream is a bare uuid4 (the completed response's message
    has its own `msg_` id), the content index goes up by one with each event after the part is added, and the done
    item carries an extra `summary: []`."""
    text = final["output"][0]["content"][0]["text"]
    words = text.split(" ")
    started = dict(final, output=[], status="in_progress", usage=None)
    item = str(uuid.uuid4())
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {"id": item, "content": [], "role": "assistant", "status": "in_progress", "type": "message"},
        },
        {
            "type": "response.content_part.added",
            "output_index": 0,
            "item_id": item,
            "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
        },
    ]
    index = 1
    for i, word in enumerate(words):
        delta = word if i == 0 else " " + word
        events.append(
            {
                "type": "response.output_text.delta",
                "content_index": index,
                "output_index": 0,
                "item_id": item,
                "delta": delta,
                "logprobs": [],
            }
        )
        index += 1
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": None}
    message = {"id": item, "content": [part], "role": "assistant", "status": "completed", "type": "message"}
    events += [
        {
            "type": "response.output_text.done",
            "output_index": 0,
            "content_index": index,
            "text": text,
            "logprobs": [],
            "item_id": item,
        },
        {
            "type": "response.content_part.done",
            "item_id": item,
            "output_index": 0,
            "content_index": index + 1,
            "part": part,
        },
        {"type": "response.output_item.done", "output_index": 0, "item": dict(message, summary=[])},
        {"type": "response.completed", "response": final},
    ]
    sse = [f"event: {e['type']}\ndata: {json.dumps(dict(e, sequence_number=n))}\n\n" for n, e in enumerate(events)]
    return sse[:4], sse[4 : 4 + len(words)], sse[4 + len(words) :]


def overlap(query: str, document: str) -> float:
    """The double's relevance score in [0, 1]: the share of the query's words found in the document."""
    asked = set(re.findall(r"\w+", query.lower()))
    found = set(re.findall(r"\w+", document.lower()))
    return len(asked & found) / len(asked) if asked else 0.0


def embedding_inputs(value: Any) -> list[str | list[int]] | None:
    """EmbeddingCompletionRequest's input (a string, strings, token ids or lists of them) as a list; None: invalid."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, int) for v in value):
            return [list(value)]
        if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
            return list(value)
    return None


def dev_routes(state: State) -> dict[tuple[str, str], Any]:
    """vLLM's development routes (VLLM_SERVER_DEV_MODE=1) that sleep mode uses; see the module's docstring."""

    def sleep(h: Handler) -> None:
        try:
            level = int((h.query.get("level") or ["1"])[0])  # api_server.py: int(query_params.get("level", "1"))
        except ValueError:
            h.send_text(500, "Internal Server Error")
            return
        with state.lock:
            if state.sleeping_tags:
                print("WARNING Executor is already sleeping.", flush=True)
                busy = False
            else:
                state.sleeping_tags = {"weights", "kv_cache"}
                if state.args.enable_sleep_mode:
                    state.weights_lost = level != 1
                freed = "the model's" if state.args.enable_sleep_mode else "0.00 GiB of"
                print(f"INFO Sleep mode (level {level}) freed {freed} memory", flush=True)
                busy = state.args.enable_sleep_mode and bool(state.running or state.waiting)
        h.send_text(200, "")
        if busy:
            die(state, "sleep with requests in flight: CUDA error: an illegal memory access was encountered")

    def wake_up(h: Handler) -> None:
        tags = h.query.get("tags") or None
        with state.lock:
            if not state.sleeping_tags:
                print("WARNING Executor is not sleeping.", flush=True)
            elif tags and any(t not in state.sleeping_tags for t in tags):
                print(f"WARNING Tag {tags} is not in sleeping tags {state.sleeping_tags}", flush=True)
            else:
                state.sleeping_tags -= set(tags) if tags else set(state.sleeping_tags)
        h.send_text(200, "")

    def is_sleeping(h: Handler) -> None:
        with state.lock:
            h.send_json(200, {"is_sleeping": bool(state.sleeping_tags)})

    def collective_rpc(h: Handler) -> None:
        """Only `reload_weights` (what a level-2 wake needs); the double knows no other worker method."""
        method = h.body().get("method")
        if method is None:
            error = {"message": "Missing 'method' in request body", "type": "Bad Request", "param": None, "code": 400}
            h.send_json(400, {"error": error})
            return
        if method != "reload_weights":
            h.send_text(500, "Internal Server Error")
            return
        if state.released and "weights" in state.sleeping_tags:
            die(state, "reload_weights into released memory: CUDA error: an illegal memory access was encountered")
            h.send_text(500, "")
            return
        state.weights_lost = False
        h.send_json(200, {"results": [None] * state.args.tensor_parallel_size})  # one per worker

    return {
        ("POST", "/sleep"): sleep,
        ("POST", "/wake_up"): wake_up,
        ("GET", "/is_sleeping"): is_sleeping,
        ("POST", "/collective_rpc"): collective_rpc,
    }


if __name__ == "__main__":
    main()
