"""The 'references' phase: checks that need the whole parsed spec.

Each message starts with the entity it is about (``model qwen-14b: …``) and
points at the field to fix. Iteration follows the file's order and the
problems are sorted on output, so runs are deterministic.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from controller.errors import Problem
from controller.spec import speculative, swap
from controller.spec.models import Fleet, Host, Model

ProblemAt = Callable[[tuple[str | int, ...], str], Problem]

# Which sources and quantizations each backend can serve. vLLM loads
# Hugging Face checkpoints; Ollama pulls its own tags; llama.cpp reads GGUF.
BACKEND_SOURCES = {"vllm": {"huggingface"}, "ollama": {"ollama"}, "llamacpp": {"gguf"}}
BACKEND_QUANT = {
    "vllm": {"none", "awq", "gptq", "fp8"},
    "ollama": {"none", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16"},
    "llamacpp": {"none", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16"},
}
BACKEND_KV = {
    "vllm": {"auto", "float16", "bfloat16", "fp8"},
    "ollama": {"auto", "float16", "q8_0", "q4_0"},
    "llamacpp": {"auto", "float16", "q8_0", "q4_0"},
}


def check(fleet: Fleet, problem: ProblemAt) -> list[Problem]:
    out: list[Problem] = []
    hosts = fleet.hosts or []
    out += _unique(problem, "hosts", "host", [h.name for h in hosts])
    out += _unique(problem, "models", "model", [m.name for m in fleet.models])
    out += _unique(problem, "groups", "group", [g.name for g in fleet.groups])
    out += _unique(problem, "users", "user", [u.name for u in fleet.users])
    out += _unique(problem, "observability.receivers", "receiver", [r.name for r in fleet.observability.receivers])
    out += _hosts(fleet, problem)
    out += _served_names(fleet, problem)
    for index, model in enumerate(fleet.models):
        out += _model(fleet, model, ("models", index), problem)
    out += swap.check(fleet, problem)
    out += speculative.check(fleet, problem)
    out += _access(fleet, problem)
    out += _gateway(fleet, problem)
    out += _observability(fleet, problem)
    return out


def _unique(problem: ProblemAt, where: str, entity: str, names: list[str]) -> list[Problem]:
    out: list[Problem] = []
    first: dict[str, int] = {}
    path: tuple[str | int, ...] = tuple(where.split("."))
    for index, name in enumerate(names):
        if name in first:
            out.append(
                problem(
                    (*path, index, "name"),
                    f"{entity} {name}: defined twice (also {where}[{first[name]}]); names must be unique",
                )
            )
        else:
            first[name] = index
    return out


def _hosts(fleet: Fleet, problem: ProblemAt) -> list[Problem]:
    out: list[Problem] = []
    hosts = fleet.hosts or []
    uuid_owner: dict[str, str] = {}
    addr_owner: dict[str, str] = {}
    mesh = fleet.mesh
    if mesh.kind == "none" and len(hosts) != 1:
        out.append(
            problem(
                ("mesh", "kind"),
                f"mesh kind 'none' is for one workstation, but {len(hosts)} hosts are listed; use wireguard, tailscale or nebula",
            )
        )
    for hi, host in enumerate(hosts):
        where = ("hosts", hi)
        address = str(host.address)
        if address in addr_owner:
            out.append(
                problem(
                    (*where, "address"), f"host {host.name}: address {address} is already host {addr_owner[address]}'s"
                )
            )
        addr_owner.setdefault(address, host.name)
        if mesh.kind == "wireguard":
            assert mesh.subnet is not None
            if not (isinstance(host.address, ipaddress.IPv4Address) and host.address in mesh.subnet):
                out.append(
                    problem(
                        (*where, "address"),
                        f"host {host.name}: address {address} is outside the mesh subnet {mesh.subnet}",
                    )
                )
            if host.endpoint is None and len(hosts) > 1:
                out.append(
                    problem(
                        (*where, "endpoint"),
                        f"host {host.name}: WireGuard needs `endpoint` (public host[:port] that peers dial)",
                    )
                )
        elif mesh.kind == "none" and not host.address.is_loopback:
            out.append(
                problem(
                    (*where, "address"),
                    f"host {host.name}: with mesh kind 'none' workers listen on loopback; use 127.0.0.1",
                )
            )
        elif mesh.kind in ("tailscale", "nebula") and host.address.is_loopback:
            out.append(
                problem((*where, "address"), f"host {host.name}: give the host's {mesh.kind} address, not loopback")
            )
        if mesh.kind != "wireguard" and host.endpoint is not None:
            out.append(
                problem((*where, "endpoint"), f"host {host.name}: `endpoint` applies only to mesh kind 'wireguard'")
            )
        for gi, gpu in enumerate(host.gpus):
            key = gpu.uuid.lower()
            if key in uuid_owner:
                out.append(
                    problem(
                        (*where, "gpus", gi, "uuid"),
                        f"host {host.name}: GPU {gpu.uuid} is already claimed by {uuid_owner[key]}; a GPU UUID is unique",
                    )
                )
            else:
                uuid_owner[key] = f"host {host.name} gpus[{gi}]"
            if gpu.vram_gib <= host.reserve_vram_gib:
                out.append(
                    problem(
                        (*where, "reserve_vram_gib"),
                        f"host {host.name}: reserve {host.reserve_vram_gib} GiB leaves nothing of GPU {gpu.uuid} ({gpu.vram_gib} GiB)",
                    )
                )
    return out


def _served_names(fleet: Fleet, problem: ProblemAt) -> list[Problem]:
    out: list[Problem] = []
    owner: dict[str, str] = {}
    for mi, model in enumerate(fleet.models):
        for ni, name in enumerate(model.served_names):
            if name in owner and owner[name] != model.name:
                field: tuple[str | int, ...] = ("name",) if ni == 0 else ("aliases", ni - 1)
                out.append(
                    problem(
                        ("models", mi, *field),
                        f"model {model.name}: name {name!r} is already used by model {owner[name]}",
                    )
                )
            owner.setdefault(name, model.name)
    return out


def _model(fleet: Fleet, model: Model, where: tuple[str | int, ...], problem: ProblemAt) -> list[Problem]:
    out: list[Problem] = []
    name = model.name
    if model.source.kind not in BACKEND_SOURCES[model.backend]:
        wanted = " or ".join(sorted(BACKEND_SOURCES[model.backend]))
        out.append(
            problem(
                (*where, "source"),
                f"model {name}: backend {model.backend} needs a {wanted} source, not {model.source.kind}",
            )
        )
    if model.quantization not in BACKEND_QUANT[model.backend]:
        out.append(
            problem(
                (*where, "quantization"),
                f"model {name}: backend {model.backend} does not serve {model.quantization!r}; use one of {', '.join(sorted(BACKEND_QUANT[model.backend]))}",
            )
        )
    if model.kv_cache_dtype not in BACKEND_KV[model.backend]:
        out.append(
            problem(
                (*where, "kv_cache_dtype"),
                f"model {name}: backend {model.backend} has no KV cache type {model.kv_cache_dtype!r}; use one of {', '.join(sorted(BACKEND_KV[model.backend]))}",
            )
        )
    if model.dtype != "auto" and model.backend != "vllm":
        out.append(
            problem((*where, "dtype"), f"model {name}: `dtype` applies to vLLM; for {model.backend} set `quantization`")
        )
    if model.gpus_per_replica > 1 and model.backend != "vllm":
        out.append(
            problem(
                (*where, "gpus_per_replica"),
                f"model {name}: tensor parallelism needs backend vllm; {model.backend} replicas stay on one GPU",
            )
        )
    if model.device == "cpu":
        if model.backend == "vllm":
            out.append(
                problem((*where, "device"), f"model {name}: vLLM needs a GPU; use llamacpp or ollama for device cpu")
            )
        if model.gpus_per_replica > 1:
            out.append(problem((*where, "gpus_per_replica"), f"model {name}: device cpu uses no GPUs"))
    if model.backend == "ollama" and model.rope_scaling is not None:
        out.append(
            problem(
                (*where, "rope_scaling"),
                f"model {name}: Ollama has no RoPE scaling setting (it cuts the context to the model's own length); "
                "remove rope_scaling, or use llamacpp or vllm",
            )
        )
    out += _pins(fleet, model, where, problem)
    out += _options(model, where, problem)
    return out


def _pins(fleet: Fleet, model: Model, where: tuple[str | int, ...], problem: ProblemAt) -> list[Problem]:
    out: list[Problem] = []
    names = {h.name: h for h in fleet.hosts or []}
    for pi, pin in enumerate(model.placement):
        at = (*where, "placement", pi)
        host = names.get(pin.host)
        if host is None:
            out.append(
                problem(
                    (*at, "host"),
                    f"model {model.name}: pinned to unknown host {pin.host!r}; known: {', '.join(sorted(names))}",
                )
            )
            continue
        if pin.gpus is None:
            continue
        if model.device == "cpu":
            out.append(problem((*at, "gpus"), f"model {model.name}: device cpu cannot be pinned to GPUs"))
            continue
        if len(pin.gpus) != model.gpus_per_replica:
            out.append(
                problem(
                    (*at, "gpus"),
                    f"model {model.name}: a pin names {len(pin.gpus)} GPU(s) but a replica uses {model.gpus_per_replica}",
                )
            )
        for gi, ref in enumerate(pin.gpus):
            if gpu_index(host, ref) is None:
                known = ", ".join(f"{i} ({g.uuid})" for i, g in enumerate(host.gpus)) or "none"
                out.append(
                    problem(
                        (*at, "gpus", gi), f"model {model.name}: host {host.name} has no GPU {ref!r}; its GPUs: {known}"
                    )
                )
    return out


def gpu_index(host: Host, ref: int | str) -> int | None:
    """Index of a GPU on a host named by index or UUID; None when it is not there."""
    if isinstance(ref, int):
        return ref if 0 <= ref < len(host.gpus) else None
    for index, gpu in enumerate(host.gpus):
        if gpu.uuid.lower() == ref.lower():
            return index
    return None


def _options(model: Model, where: tuple[str | int, ...], problem: ProblemAt) -> list[Problem]:
    from controller.backends import reserved_options  # the backends own their flags

    out: list[Problem] = []
    reserved = reserved_options(model.backend)
    if model.task == "rerank" and model.backend == "ollama":
        out.append(
            problem(
                (*where, "task"),
                f"model {model.name}: Ollama serves no rerank API; run the reranker with backend llamacpp or vllm",
            )
        )
    for key in sorted(model.options):
        at = (*where, "options", key)
        if model.backend == "ollama" and not key.startswith("OLLAMA_"):
            out.append(problem(at, f"model {model.name}: Ollama takes OLLAMA_* variables, not flag {key!r}"))
        elif model.backend != "ollama" and key.startswith("OLLAMA_"):
            out.append(problem(at, f"model {model.name}: {key} is an Ollama variable; {model.backend} takes flags"))
        elif key in reserved:
            out.append(problem(at, f"model {model.name}: {key!r} is set by the plan ({reserved[key]}); remove it"))
        elif key == "pooling" and model.task == "rerank":
            out.append(problem(at, f"model {model.name}: a reranker's pooling is rank (task: rerank); remove it"))
    return out


def _access(fleet: Fleet, problem: ProblemAt) -> list[Problem]:
    out: list[Problem] = []
    served = {n for m in fleet.models for n in m.served_names}
    groups = {g.name for g in fleet.groups}
    for gi, group in enumerate(fleet.groups):
        out += _model_refs(problem, ("groups", gi), f"group {group.name}", group.models, served)
    for ui, user in enumerate(fleet.users):
        out += _model_refs(problem, ("users", ui), f"user {user.name}", user.models, served)
        for ri, ref in enumerate(user.groups):
            if ref not in groups:
                out.append(
                    problem(
                        ("users", ui, "groups", ri),
                        f"user {user.name}: unknown group {ref!r}; known: {', '.join(sorted(groups)) or 'none'}",
                    )
                )
    return out


def _model_refs(
    problem: ProblemAt, where: tuple[str | int, ...], who: str, refs: Iterable[str], served: set[str]
) -> list[Problem]:
    out: list[Problem] = []
    for index, ref in enumerate(refs):
        if ref != "*" and ref not in served:
            out.append(
                problem(
                    (*where, "models", index),
                    f"{who}: granted unknown model {ref!r}; known: {', '.join(sorted(served))}",
                )
            )
    return out


def _gateway(fleet: Fleet, problem: ProblemAt) -> list[Problem]:
    out: list[Problem] = []
    names = {h.name for h in fleet.hosts or []}
    if fleet.gateway.host not in names:
        out.append(
            problem(
                ("gateway", "host"), f"gateway: unknown host {fleet.gateway.host!r}; known: {', '.join(sorted(names))}"
            )
        )
    if fleet.gateway.public_name == "localhost" and fleet.gateway.tls.mode == "acme":
        out.append(
            problem(("gateway", "tls", "mode"), "gateway: ACME cannot issue for 'localhost'; use tls mode 'internal'")
        )
    if not fleet.auth.api_keys and fleet.auth.oidc is None:
        out.append(problem(("auth",), "auth: neither API keys nor OIDC is enabled, so nobody could get in; enable one"))
    return out


def _observability(fleet: Fleet, problem: ProblemAt) -> list[Problem]:
    out: list[Problem] = []
    obs = fleet.observability
    names = {r.name for r in obs.receivers}
    for ri, route in enumerate(obs.routes):
        if route.receiver not in names:
            out.append(
                problem(
                    ("observability", "routes", ri, "receiver"),
                    f"alert route {route.severity}: unknown receiver {route.receiver!r}",
                )
            )
    if obs.default_receiver is not None and obs.default_receiver not in names:
        out.append(
            problem(("observability", "default_receiver"), f"observability: unknown receiver {obs.default_receiver!r}")
        )
    if obs.routes and obs.default_receiver is None:
        out.append(
            problem(
                ("observability", "default_receiver"),
                "observability: routes need a `default_receiver` for alerts no route matches",
            )
        )
    return out
