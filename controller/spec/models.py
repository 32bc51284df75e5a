"""The fleet spec: strict pydantic models of ``fleet.yaml``.

Field descriptions live on the fields; ``controller schema`` prints the JSON
Schema generated from them, and a test keeps the examples and the schema in
agreement. Cross-references (model ↔ host, user ↔ model, …) are checked
after parsing, in ``controller.spec.refs``.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# -- shared types -----------------------------------------------------------------

Name = Annotated[
    str,
    Field(
        pattern=r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$",
        description="A short name: lower-case letters, digits and '-', at most 40 characters.",
    ),
]
ServedName = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$",
        description="The name clients send as `model`: letters, digits and . _ : / -, at most 128 characters.",
    ),
]
GpuUuid = Annotated[
    str,
    Field(
        pattern=r"^(GPU|MIG)-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
        description="The GPU's UUID as `nvidia-smi -L` prints it, e.g. GPU-5c3ad4a2-…; also the CDI device name.",
    ),
]
Port = Annotated[int, Field(ge=1, le=65535)]
ModelRef = Annotated[
    str,
    Field(description="A model's served name or alias, or '*' for every model."),
]
PerMinute = Annotated[int, Field(ge=1, le=1_000_000, description="Requests per minute.")]
DailyTokens = Annotated[int, Field(ge=1, le=10**12, description="Prompt plus completion tokens per UTC day.")]


class StrictModel(BaseModel):
    """Base of every spec model.

    ``extra="forbid"``: a typo in a user's YAML (``contxt: 8192``) must fail
    loudly with a did-you-mean, not be silently ignored and leave the default
    in force. Models are frozen: the planner derives new values, it never
    edits the spec.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# -- mesh ---------------------------------------------------------------------------


class Mesh(StrictModel):
    kind: Annotated[
        Literal["wireguard", "tailscale", "nebula", "none"],
        Field(
            description="`wireguard`: the controller generates the mesh; `tailscale`/`nebula`: an existing "
            "mesh whose addresses the hosts list; `none`: a single workstation on loopback."
        ),
    ]
    subnet: Annotated[
        ipaddress.IPv4Network | None,
        Field(description="WireGuard only: the mesh subnet that every host address lies in."),
    ] = None
    listen_port: Annotated[Port, Field(description="WireGuard only: UDP port each host listens on.")] = 51820
    interface: Annotated[
        str,
        Field(pattern=r"^[a-z][a-z0-9]{0,14}$", description="WireGuard only: interface name on every host."),
    ] = "fleet0"

    @model_validator(mode="after")
    def _wireguard_needs_subnet(self) -> Mesh:
        if self.kind == "wireguard" and self.subnet is None:
            raise ValueError("mesh kind 'wireguard' needs `subnet` (e.g. 10.77.0.0/24)")
        if self.kind != "wireguard" and self.subnet is not None:
            raise ValueError(f"`subnet` applies only to mesh kind 'wireguard', not {self.kind!r}; remove it")
        return self


# -- hosts --------------------------------------------------------------------------


class Gpu(StrictModel):
    uuid: GpuUuid
    name: Annotated[str, Field(min_length=1, max_length=128, description="Marketing name, e.g. 'NVIDIA RTX 4090'.")]
    vram_gib: Annotated[float, Field(gt=0, le=1024, description="Total memory of this GPU in GiB.")]


class Host(StrictModel):
    name: Name
    address: Annotated[
        ipaddress.IPv4Address | ipaddress.IPv6Address,
        Field(
            description="The host's mesh address (loopback for a single workstation). Workers and the "
            "agent listen only here."
        ),
    ]
    ssh: Annotated[
        str | None,
        Field(
            pattern=r"^([a-z_][a-z0-9_-]{0,31}@)?[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?$",
            description="SSH target for deploy, `user@host[:port]`; omit for the local machine.",
        ),
    ] = None
    endpoint: Annotated[
        str | None,
        Field(
            pattern=r"^[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?$",
            description="WireGuard only: public `host[:port]` that peers dial.",
        ),
    ] = None
    runtime: Annotated[
        Literal["compose", "quadlet"],
        Field(description="How workers run on this host: Docker/Podman Compose, or Podman Quadlet units."),
    ] = "compose"
    gpus: Annotated[list[Gpu], Field(max_length=64, description="The host's GPUs, in nvidia-smi index order.")] = []
    reserve_vram_gib: Annotated[
        float,
        Field(ge=0, le=64, description="Kept free on every GPU of this host (driver, display, other users)."),
    ] = 0.5
    cpu_workers: Annotated[
        int,
        Field(ge=0, le=256, description="How many CPU-only model replicas this host may run (device: cpu)."),
    ] = 0
    worker_port_base: Annotated[
        Port,
        Field(description="First port for workers on this host; each worker takes the next free one."),
    ] = 8100
    agent_port: Annotated[Port, Field(description="Port of the host agent (telemetry, GPU pinning checks).")] = 9400


# -- models -------------------------------------------------------------------------


class Source(StrictModel):
    huggingface: Annotated[
        str | None,
        Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$", description="Hugging Face repo `org/name`."),
    ] = None
    revision: Annotated[
        str | None,
        Field(pattern=r"^[A-Za-z0-9._/-]{1,100}$", description="Hugging Face revision (branch, tag or commit)."),
    ] = None
    ollama: Annotated[
        str | None,
        Field(pattern=r"^[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9._-]+)?$", description="Ollama model tag, `name:tag`."),
    ] = None
    gguf: Annotated[
        str | None,
        Field(min_length=1, max_length=1024, description="GGUF file: a path on the host, or an https:// URL."),
    ] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [k for k in ("huggingface", "ollama", "gguf") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of huggingface, ollama, gguf (got {', '.join(given) or 'none'})")
        if self.revision is not None and self.huggingface is None:
            raise ValueError("`revision` applies only to a huggingface source")
        if self.gguf is not None:
            if "\n" in self.gguf or "\x00" in self.gguf:
                raise ValueError("gguf path contains a control character")
            if "://" in self.gguf and not self.gguf.startswith("https://"):
                raise ValueError(f"gguf URL must use https:// (got {self.gguf!r})")
        return self

    @property
    def kind(self) -> Literal["huggingface", "ollama", "gguf"]:
        if self.huggingface is not None:
            return "huggingface"
        if self.ollama is not None:
            return "ollama"
        return "gguf"


class Arch(StrictModel):
    layers: Annotated[int | None, Field(ge=1, le=1024, description="Transformer layers (num_hidden_layers).")] = None
    kv_heads: Annotated[int | None, Field(ge=1, le=1024, description="Key/value heads (num_key_value_heads).")] = None
    head_dim: Annotated[int | None, Field(ge=1, le=4096, description="Dimension of one attention head.")] = None
    params_b: Annotated[float | None, Field(gt=0, le=10_000, description="Parameter count in billions.")] = None
    weights_gib: Annotated[
        float | None,
        Field(
            gt=0,
            le=10_000,
            description="Size of the weights the GPU holds, in GiB; default: params × bits per weight of the "
            "quantization. For a local GGUF: the sum of its tensors at their own types, less the input "
            "embeddings, which llama.cpp keeps in system memory when the model has a separate output layer.",
        ),
    ] = None
    heads: Annotated[
        int | None,
        Field(
            ge=1,
            le=4096,
            description="Attention (query) heads (num_attention_heads, GGUF attention.head_count); without flash "
            "attention llama.cpp holds one score per head, token and context position. Default: estimated "
            "from params_b and layers.",
        ),
    ] = None
    hidden_size: Annotated[
        int | None,
        Field(
            ge=1,
            le=65_536,
            description="Model width (hidden_size, GGUF embedding_length). Default: estimated from params_b and "
            "layers.",
        ),
    ] = None
    vocab_size: Annotated[
        int | None,
        Field(
            ge=1,
            le=4_194_304,
            description="Vocabulary size (vocab_size, GGUF token count): sizes the 16-bit embeddings of "
            "AWQ/GPTQ/FP8 checkpoints and llama.cpp's logits buffer. Default: 262144, the largest common one.",
        ),
    ] = None
    tied_embeddings: Annotated[
        bool | None,
        Field(description="The output layer reuses the input embeddings (tie_word_embeddings); default: not."),
    ] = None
    max_context: Annotated[
        int | None,
        Field(
            ge=1,
            le=16_777_216,
            description="The model's own maximum context in tokens (config.json max_position_embeddings, with "
            "its rope_scaling; GGUF context_length). A longer `context` is refused unless `rope_scaling` allows it.",
        ),
    ] = None
    projector_gib: Annotated[
        float | None,
        Field(
            ge=0,
            le=10_000,
            description="Multimodal projector / vision encoder weights in GiB, held beside the language model "
            "(llama.cpp `mmproj` file, the vision tower of a config.json's vision_config).",
        ),
    ] = None
    tensor_types: Annotated[
        dict[str, int] | None,
        Field(description="GGUF only: how many tensors of each type the file holds (read from it), e.g. q4_K: 193."),
    ] = None

    def missing(self) -> list[str]:
        return [k for k in ("layers", "kv_heads", "head_dim", "params_b") if getattr(self, k) is None]


class Pin(StrictModel):
    host: Annotated[str, Field(description="A host name from `hosts`.")]
    gpus: Annotated[
        list[int | str] | None,
        Field(max_length=8, description="GPUs on that host, by index or UUID; omit for any GPU of the host."),
    ] = None


Duration = Annotated[
    str,
    Field(
        pattern=r"^[1-9][0-9]{0,6}(s|m|h)$",
        description="A duration: a whole number of seconds, minutes or hours, e.g. `90s`, `10m`, `2h`.",
    ),
]


def duration_s(text: str) -> float:
    """Seconds of a `Duration` (`90s`, `10m`, `2h`)."""
    return float(text[:-1]) * {"s": 1, "m": 60, "h": 3600}[text[-1]]


class Swap(StrictModel):
    """On-demand loading: the model shares the GPUs of its swap group with the group's other models, more than
    fit at once, and is made resident when a request asks for it."""

    group: Annotated[str, Field(description="A `swap_groups` entry: the GPUs this model shares.")]
    ttl: Annotated[
        Duration | None,
        Field(description="Unload after this long idle (no request in flight); omit to unload only when evicted."),
    ] = None
    resident: Annotated[
        Literal["always", "on_demand"],
        Field(description="`always`: loaded at start and never evicted; `on_demand`: loaded when asked for."),
    ] = "on_demand"
    swappable: Annotated[
        bool,
        Field(description="false: a load of this model that would need to evict others is refused instead."),
    ] = True
    preload: Annotated[bool, Field(description="Load at start (it may be evicted later).")] = False
    unload: Annotated[
        Literal["sleep", "stop"] | None,
        Field(
            description="vLLM only: how an eviction frees the GPU. `sleep` (the default): sleep mode level 1, the "
            "weights to CPU memory, fast to wake, but vLLM keeps its CUDA context and graphs (about 5 GiB, which "
            "the plan books beside every other model of its GPU); `stop`: the worker is stopped, and started again "
            "at its next load (slower, frees everything). A llama.cpp worker is always stopped; Ollama frees its "
            "model."
        ),
    ] = None

    @property
    def ttl_s(self) -> float | None:
        return None if self.ttl is None else duration_s(self.ttl)


class Speculative(StrictModel):
    """Speculative decoding: a cheap guess of the next tokens that the model checks in one step."""

    method: Annotated[
        Literal["draft", "ngram", "mtp"],
        Field(
            description="`draft`: a small model of the same tokenizer guesses (llama.cpp `--model-draft`, vLLM "
            "`--speculative-config` with a model); `ngram`: guesses from the prompt's own n-grams (no extra "
            "weights); `mtp`: the model's own multi-token-prediction heads (vLLM)."
        ),
    ]
    draft: Annotated[
        Source | None,
        Field(description="`draft` only: the draft model (a GGUF for llama.cpp, a Hugging Face repo for vLLM)."),
    ] = None
    draft_arch: Annotated[
        Arch, Field(description="Architecture numbers of the draft for the VRAM estimate (read from a local file).")
    ] = Arch()
    tokens: Annotated[int, Field(ge=1, le=32, description="Tokens guessed per step.")] = 5


DType = Literal["auto", "float16", "bfloat16", "float32"]
Quantization = Literal["none", "awq", "gptq", "fp8", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16"]
KvDType = Literal["auto", "float16", "bfloat16", "fp8", "q8_0", "q4_0"]
OptionValue = str | int | float | bool

_OPTION_KEY = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$|^OLLAMA_[A-Z0-9_]{1,60}$")


class Model(StrictModel):
    name: ServedName
    aliases: Annotated[list[ServedName], Field(max_length=16, description="Other names clients may send.")] = []
    backend: Annotated[
        Literal["vllm", "ollama", "llamacpp"], Field(description="The inference server that runs this model.")
    ]
    source: Source
    task: Annotated[
        Literal["generate", "embed", "rerank"],
        Field(
            description="What the model does, which decides the API routes it serves: `generate` (chat, completions, "
            "and where the backend has them OpenAI Responses and Anthropic Messages), `embed` (/v1/embeddings) or "
            "`rerank` (/v1/rerank; llama.cpp and vLLM). The plan starts the backend in that mode."
        ),
    ] = "generate"
    dtype: Annotated[DType, Field(description="Weight dtype (vLLM); 'auto' reads the checkpoint (bf16/fp16).")] = "auto"
    quantization: Annotated[
        Quantization, Field(description="Weight quantization; GGUF types for llama.cpp/Ollama, awq/gptq/fp8 for vLLM.")
    ] = "none"
    kv_cache_dtype: Annotated[KvDType, Field(description="KV cache element type; 'auto' is 16-bit.")] = "auto"
    arch: Annotated[Arch, Field(description="Architecture numbers for the VRAM estimate.")] = Arch()
    arch_from: Annotated[
        str | None,
        Field(description="Read missing arch numbers from a local `config.json` or `.gguf` (relative to the spec)."),
    ] = None
    context: Annotated[int, Field(ge=128, le=2_097_152, description="Context length per request, in tokens.")]
    parallel: Annotated[int, Field(ge=1, le=1024, description="Requests served at once per replica (KV slots).")] = 1
    replicas: Annotated[int, Field(ge=1, le=64, description="How many copies of the model serve requests.")] = 1
    gpus_per_replica: Annotated[
        int, Field(ge=1, le=8, description="Tensor parallelism: GPUs of one host that one replica spans (vLLM).")
    ] = 1
    device: Annotated[Literal["gpu", "cpu"], Field(description="'cpu' runs on CPU (llama.cpp, Ollama).")] = "gpu"
    placement: Annotated[
        list[Pin], Field(max_length=64, description="Where replicas may go; empty means anywhere that fits.")
    ] = []
    swap: Annotated[
        Swap | None,
        Field(description="Load this model on demand, sharing the GPUs of a swap group (see `swap_groups`)."),
    ] = None
    speculative: Annotated[Speculative | None, Field(description="Speculative decoding.")] = None
    rope_scaling: Annotated[
        float | None,
        Field(
            ge=1,
            le=64,
            description="Allow a `context` up to this many times the model's own maximum (arch.max_context) by "
            "RoPE scaling (YaRN); quality may drop beyond the trained length. Without it a longer context is "
            "refused.",
        ),
    ] = None
    flash_attention: Annotated[
        bool,
        Field(
            description="llama.cpp: run with flash attention (`--flash-attn on`), so its compute buffer no longer "
            "holds attention scores for the whole context; a quantized KV cache turns it on. Off, the estimate "
            "counts those scores. Ollama books them either way."
        ),
    ] = False
    options: Annotated[
        dict[str, OptionValue],
        Field(
            max_length=64,
            description="Extra backend flags, `flag-name: value` (vLLM, llama.cpp) or `OLLAMA_*` variables "
            "(Ollama). Passed as separate arguments, never through a shell; flags the plan sets are refused.",
        ),
    ] = {}

    @field_validator("options")
    @classmethod
    def _safe_options(cls, value: dict[str, OptionValue]) -> dict[str, OptionValue]:
        for key, item in value.items():
            if not _OPTION_KEY.match(key):
                raise ValueError(f"option {key!r} is not a flag name (lower-case, digits, '-') or an OLLAMA_* variable")
            if isinstance(item, str) and any(ch in item for ch in "\n\r\x00"):
                raise ValueError(f"option {key!r} contains a control character")
        return value

    @property
    def served_names(self) -> list[str]:
        return [self.name, *self.aliases]


# -- gateway ------------------------------------------------------------------------


class Tls(StrictModel):
    mode: Annotated[
        Literal["acme", "internal", "files"],
        Field(description="`acme`: a public certificate; `internal`: Caddy's own CA; `files`: your cert/key."),
    ]
    email: Annotated[str | None, Field(pattern=r"^[^@\s]+@[^@\s]+$", description="ACME account e-mail.")] = None
    cert_file: Annotated[str | None, Field(description="`files` mode: certificate path on the gateway host.")] = None
    key_file: Annotated[str | None, Field(description="`files` mode: key path on the gateway host (mode 0600).")] = None

    @model_validator(mode="after")
    def _mode_fields(self) -> Tls:
        if self.mode == "files" and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls mode 'files' needs both `cert_file` and `key_file`")
        if self.mode != "files" and (self.cert_file or self.key_file):
            raise ValueError(f"`cert_file`/`key_file` apply only to tls mode 'files', not {self.mode!r}")
        if self.mode != "acme" and self.email is not None:
            raise ValueError(f"`email` applies only to tls mode 'acme', not {self.mode!r}")
        return self


class GatewayPorts(StrictModel):
    https: Annotated[Port, Field(description="Public HTTPS port (Envoy terminates TLS).")] = 443
    http: Annotated[Port, Field(description="Public HTTP port (Caddy; redirects and ACME).")] = 80
    envoy: Annotated[Port, Field(description="Envoy's plain-HTTP listener, loopback only (diagnostics).")] = 10000
    envoy_admin: Annotated[Port, Field(description="Envoy's admin interface, loopback only.")] = 9901
    gatekeeper: Annotated[
        Port, Field(description="The gatekeeper (asked by Envoy who a caller is), loopback only.")
    ] = 9090
    swapper: Annotated[
        Port,
        Field(
            description="The swap coordinator (loads on-demand models; holds their requests meanwhile), loopback only."
        ),
    ] = 9095
    caddy_admin: Annotated[Port, Field(description="Caddy's admin API, loopback only.")] = 2019
    caddy_tls: Annotated[
        Port,
        Field(description="Caddy's own HTTPS site, loopback only: it obtains and renews the certificate Envoy serves."),
    ] = 8444
    prometheus: Annotated[Port, Field(description="Prometheus, loopback only.")] = 9091
    alertmanager: Annotated[Port, Field(description="Alertmanager, loopback only.")] = 9093
    grafana: Annotated[Port, Field(description="Grafana, loopback only.")] = 3000


class ForwardAuth(StrictModel):
    """An SSO outpost that already guards the operator's sites (Authelia, Authentik, oauth2-proxy), asked by
    Caddy about browser requests (no API key) in `front: caddy`; its identity headers name the user."""

    url: Annotated[
        str,
        Field(
            pattern=r"^https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/?&=%+\-]*)?$",
            description="The outpost's forward-auth endpoint, e.g. Authelia's"
            " `http://127.0.0.1:9091/api/authz/forward-auth` or Authentik's"
            " `http://outpost:9000/outpost.goauthentik.io/auth/caddy`. A 2xx answer lets the request on; anything"
            " else (a redirect to the login page, 401) goes back to the browser as it is.",
        ),
    ]
    user_header: Annotated[
        str, Field(pattern=r"^[A-Za-z0-9-]{1,64}$", description="The answer's header naming the user.")
    ] = "Remote-User"
    groups_header: Annotated[
        str, Field(pattern=r"^[A-Za-z0-9-]{1,64}$", description="The answer's header listing the user's groups.")
    ] = "Remote-Groups"
    groups_separator: Annotated[
        str, Field(pattern=r"^[,;| ]$", description="What separates the groups in `groups_header`.")
    ] = ","


class Gateway(StrictModel):
    host: Annotated[str, Field(description="The host that runs Envoy, Caddy and the gatekeeper.")]
    public_name: Annotated[
        str,
        Field(
            pattern=r"^(localhost|([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63})$",
            description="The DNS name clients use; the TLS certificate is issued for it.",
        ),
    ]
    tls: Tls
    front: Annotated[
        Literal["envoy", "caddy"],
        Field(
            description="Who terminates TLS and asks the gatekeeper. `envoy` (the default, and the faster): Envoy"
            " serves the public HTTPS port and its Lua filter asks the gatekeeper, reusing an API key's answer"
            " within the revocation delay. `caddy`: Caddy serves the public HTTPS port with its own certificate and"
            " asks the gatekeeper on every request (`forward_auth`), then hands the request to Envoy over a"
            " private Unix socket; Envoy routes, limits and meters as in `envoy` mode. For operators who keep"
            " Caddy as their front door; it costs more CPU per request (docs/performance.md)."
        ),
    ] = "envoy"
    forward_auth: Annotated[
        ForwardAuth | None,
        Field(
            description="With `front: caddy`: an existing SSO outpost that decides who a browser (a request with"
            " no API key) is; the gatekeeper maps its user and groups as it maps SSO logins. API keys and provider"
            " tokens go to the gatekeeper as always."
        ),
    ] = None
    ports: GatewayPorts = GatewayPorts()
    bind: Annotated[
        ipaddress.IPv4Address | ipaddress.IPv6Address | None,
        Field(description="Address the public ports listen on (Envoy's HTTPS, Caddy's HTTP); omit for all interfaces."),
    ] = None
    max_body_mib: Annotated[
        float, Field(gt=0, le=512, description="Largest request body accepted, in MiB (413 beyond).")
    ] = 16
    stream_idle_timeout_s: Annotated[
        int, Field(ge=5, le=3600, description="A stream with no bytes for this long is closed (stall guard).")
    ] = 300
    request_headers_timeout_s: Annotated[
        int, Field(ge=1, le=120, description="A client must send all headers within this time (slowloris).")
    ] = 10
    max_request_tokens: Annotated[
        int, Field(ge=1, le=10_000_000, description="Largest `max_tokens` a request may ask for.")
    ] = 32768

    @model_validator(mode="after")
    def _caddy_front_files(self) -> Gateway:
        if self.forward_auth is not None and self.front != "caddy":
            raise ValueError("`forward_auth` needs front 'caddy' (Caddy asks the outpost); set `front: caddy`")
        tls = self.tls
        if self.front == "caddy" and tls.mode == "files":
            for name, path in (("cert_file", tls.cert_file), ("key_file", tls.key_file)):
                if path is not None and not str(path).startswith("/"):
                    raise ValueError(
                        f"front 'caddy' serves tls.{name} itself: give it as an absolute path, not {path!r}"
                    )
        return self


# -- auth ---------------------------------------------------------------------------


# https anywhere, or http on loopback (the tests' own provider).
HTTPS_OR_LOOPBACK_URL = r"^https://[^\s/$.?#].[^\s]*$|^http://(127\.0\.0\.1|localhost)(:[0-9]+)?(/[^\s]*)?$"


class Oidc(StrictModel):
    issuer: Annotated[
        str,
        Field(
            pattern=HTTPS_OR_LOOPBACK_URL,
            description="Issuer URL; https, or http on loopback for tests.",
        ),
    ]
    client_id: Annotated[str, Field(min_length=1, max_length=256)]
    client_secret_file: Annotated[
        str, Field(min_length=1, description="Path on the gateway host of a file holding the client secret.")
    ]
    groups_claim: Annotated[str, Field(min_length=1, description="ID-token claim holding the user's groups.")] = (
        "groups"
    )
    audience: Annotated[
        str | None, Field(description="Expected `aud` of provider access tokens presented by API clients.")
    ] = None
    scopes: Annotated[list[str], Field(min_length=1)] = ["openid", "profile", "email", "groups"]
    introspection: Annotated[
        bool,
        Field(
            description="Accept opaque (non-JWT) provider tokens, such as Authentik's API tokens, through the"
            " provider's token introspection endpoint (RFC 7662), asked as `client_id` with `client_secret_basic`."
            " A token passes only when the provider says it is active, its `exp` has not passed, its `token_type`"
            " (if any) is an access token, and its `aud` or `client_id` names `audience` or `client_id`; its user"
            " and groups are read as from SSO (`preferred_username`, else `username`, `email`, `sub`;"
            " `groups_claim`). Each answer, yes or no, is kept at most `auth.revocation_delay_s` and never past"
            " the token's `exp`. An unreachable or failing endpoint is a 503 (fail closed)."
        ),
    ] = True
    introspection_endpoint: Annotated[
        str | None,
        Field(
            pattern=HTTPS_OR_LOOPBACK_URL,
            description="The introspection endpoint, when it is not the discovery document's"
            " `introspection_endpoint`; https, or http on loopback for tests.",
        ),
    ] = None


class Auth(StrictModel):
    api_keys: Annotated[bool, Field(description="Accept API keys (`sk-…`) created with `controller keys`.")] = True
    oidc: Oidc | None = None
    revocation_delay_s: Annotated[
        int, Field(ge=0, le=300, description="Upper bound on how long a revoked key may still work.")
    ] = 5


ADMIN_HELP = "May open the operator console (/console) and act there: load, unload, restart, keys."


class Group(StrictModel):
    name: Name
    models: Annotated[list[ModelRef], Field(description="Models members may use.")] = []
    admin: Annotated[bool, Field(description=ADMIN_HELP)] = False
    rpm: PerMinute | None = None
    daily_tokens: DailyTokens | None = None


class User(StrictModel):
    name: Name
    email: Annotated[str | None, Field(pattern=r"^[^@\s]+@[^@\s]+$")] = None
    groups: list[str] = []
    models: Annotated[list[ModelRef], Field(description="Models this user may use besides their groups'.")] = []
    admin: Annotated[bool, Field(description=ADMIN_HELP)] = False
    rpm: PerMinute | None = None
    daily_tokens: DailyTokens | None = None


# -- observability ------------------------------------------------------------------


class Thresholds(StrictModel):
    gpu_temp_c: Annotated[float, Field(ge=40, le=120)] = 85
    vram_used_ratio: Annotated[float, Field(gt=0, le=1)] = 0.97
    queue_depth: Annotated[int, Field(ge=1)] = 16
    ttft_p95_s: Annotated[float, Field(gt=0)] = 5.0
    latency_p95_s: Annotated[float, Field(gt=0)] = 60.0
    error_ratio: Annotated[float, Field(gt=0, le=1)] = 0.05
    cert_expiry_days: Annotated[int, Field(ge=1, le=90)] = 14


class Receiver(StrictModel):
    name: Name
    email: Annotated[str | None, Field(pattern=r"^[^@\s]+@[^@\s]+$")] = None
    webhook_url: Annotated[str | None, Field(pattern=r"^https?://[^\s]+$")] = None

    @model_validator(mode="after")
    def _one_target(self) -> Receiver:
        if (self.email is None) == (self.webhook_url is None):
            raise ValueError("give exactly one of `email`, `webhook_url`")
        return self


class AlertRoute(StrictModel):
    severity: Literal["critical", "warning", "info"]
    receiver: str


class Observability(StrictModel):
    thresholds: Thresholds = Thresholds()
    receivers: Annotated[list[Receiver], Field(max_length=32)] = []
    routes: Annotated[list[AlertRoute], Field(max_length=32)] = []
    default_receiver: str | None = None


# -- the fleet ----------------------------------------------------------------------


class Images(StrictModel):
    """Container images per backend, pinned by tag; override to use a mirror."""

    vllm: str = "docker.io/vllm/vllm-openai:v0.11.0"
    ollama: str = "docker.io/ollama/ollama:0.12.6"
    llamacpp: str = "ghcr.io/ggml-org/llama.cpp:server-cuda-b6800"
    llamacpp_cpu: str = "ghcr.io/ggml-org/llama.cpp:server-b6800"
    agent: str = "localhost/fleet-agent:0.1.0"
    gatekeeper: str = "localhost/fleet-gatekeeper:0.1.0"
    envoy: str = "docker.io/envoyproxy/envoy:v1.40.0"
    caddy: str = "docker.io/library/caddy:2.11.0"
    prometheus: str = "docker.io/prom/prometheus:v3.5.0"
    alertmanager: str = "docker.io/prom/alertmanager:v0.28.1"
    grafana: str = "docker.io/grafana/grafana:12.1.1"

    @field_validator(
        "vllm",
        "ollama",
        "llamacpp",
        "llamacpp_cpu",
        "agent",
        "gatekeeper",
        "envoy",
        "caddy",
        "prometheus",
        "alertmanager",
        "grafana",
    )
    @classmethod
    def _pinned(cls, value: str) -> str:
        if not re.match(r"^[a-z0-9.-]+(:[0-9]+)?/[a-z0-9._/-]+(:[A-Za-z0-9._-]+|@sha256:[0-9a-f]{64})$", value):
            raise ValueError(f"image {value!r} must be `registry/name:tag` or pinned by digest")
        if value.endswith(":latest"):
            raise ValueError(f"image {value!r} uses ':latest'; pin a version tag")
        return value


class Secrets(StrictModel):
    hf_token_file: Annotated[
        str | None,
        Field(description="Path on each GPU host of a file with the Hugging Face token (mounted, never in env)."),
    ] = None


class SwapGroup(StrictModel):
    """GPUs of one host shared by on-demand models (each model's `swap.group`): more models than fit at once,
    the one asked for made resident, others evicted least recently used first."""

    name: Name
    host: Annotated[str, Field(description="The host whose GPUs the group shares.")]
    gpus: Annotated[
        list[int | str] | None,
        Field(max_length=64, description="GPUs of that host, by index or UUID; omit for all of them."),
    ] = None
    cpu_slots: Annotated[
        int | None,
        Field(
            ge=1,
            le=256,
            description="A group of CPU models (device: cpu) instead of GPUs: how many of them run at once, taken "
            "from the host's cpu_workers.",
        ),
    ] = None
    max_queue: Annotated[
        int, Field(ge=1, le=100_000, description="Requests that may wait for one model's load; beyond: 429.")
    ] = 64
    max_wait_s: Annotated[
        float, Field(gt=0, le=3600, description="How long a request may wait for its model; beyond: 503.")
    ] = 300
    min_resident_s: Annotated[
        float, Field(ge=0, le=86_400, description="A loaded model is not evicted before this (thrash guard).")
    ] = 30
    drain_s: Annotated[
        float,
        Field(gt=0, le=86_400, description="How long an eviction waits for the evicted model's requests to finish."),
    ] = 600
    user_swaps_per_hour: Annotated[
        int, Field(ge=1, le=100_000, description="Loads one user's requests may cause per hour; beyond: 429.")
    ] = 60
    concurrency: Annotated[
        int | None,
        Field(
            ge=1, le=4096, description="Queued requests sent on at once after a load; default: the model's parallel."
        ),
    ] = None


class Fleet(StrictModel):
    version: Annotated[Literal[1], Field(description="Spec format version.")]
    name: Name
    mesh: Mesh
    hosts: Annotated[list[Host] | None, Field(max_length=2048)] = None
    hosts_file: Annotated[
        str | None, Field(description="A YAML file (relative to this one) with a `hosts:` list, instead of `hosts`.")
    ] = None
    images: Images = Images()
    secrets: Secrets = Secrets()
    models: Annotated[list[Model], Field(min_length=1, max_length=2048)]
    swap_groups: Annotated[
        list[SwapGroup], Field(max_length=64, description="GPUs shared by on-demand models (`models[].swap`).")
    ] = []
    gateway: Gateway
    auth: Auth = Auth()
    groups: Annotated[list[Group], Field(max_length=256)] = []
    users: Annotated[list[User], Field(max_length=4096)] = []
    observability: Observability = Observability()

    @model_validator(mode="after")
    def _hosts_given(self) -> Fleet:
        if not self.hosts:
            raise ValueError("give `hosts` (a non-empty list) or `hosts_file`")
        return self

    def host(self, name: str) -> Host:
        return self._hosts[name]  # KeyError for a host not in the spec

    @functools.cached_property
    def _hosts(self) -> dict[str, Host]:
        """Hosts by name, made once (the spec is frozen): renderers ask for every worker's host."""
        return {h.name: h for h in self.hosts or []}
