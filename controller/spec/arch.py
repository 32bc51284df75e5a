"""The 'defaults' phase: fill architecture numbers from local model files.

A model's VRAM estimate needs layers, KV heads, head dimension and the
parameter count. They may be written in the spec, or read from a local
Hugging Face ``config.json`` or a GGUF file's metadata (``arch_from``, or the
model's own GGUF source when it is a local file). Numbers in the spec win.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.errors import Problem
from controller.spec.models import Arch, Fleet, Model

ProblemAt = Callable[[tuple[str | int, ...], str], Problem]
GIB = 1024**3


def resolve_arch(fleet: Fleet, base_dir: Path, problem: ProblemAt) -> tuple[Fleet, list[Problem]]:
    problems: list[Problem] = []
    models: list[Model] = []
    for index, model in enumerate(fleet.models):
        where = ("models", index)
        found: dict[str, Any] = {}
        source_file = _local_file(model, base_dir)
        try:
            if model.arch_from is not None:
                target = base_dir / model.arch_from
                if not target.is_file():
                    problems.append(problem((*where, "arch_from"), f"model {model.name}: no such file {str(target)!r}"))
                else:
                    found = read_arch(target)
            elif source_file is not None:
                found = read_arch(source_file)
        except (OSError, ValueError, KeyError) as exc:
            problems.append(problem((*where, "arch_from"), f"model {model.name}: cannot read architecture: {exc}"))
        given = model.arch.model_dump(exclude_none=True)
        arch = Arch(**{**found, **given})
        missing = arch.missing()
        if missing:
            problems.append(
                problem(
                    (*where, "arch"),
                    f"model {model.name}: unknown {', '.join(missing)}; give them under `arch` or point "
                    "`arch_from` at a local config.json or .gguf",
                )
            )
        models.append(model.model_copy(update={"arch": arch}))
    return fleet.model_copy(update={"models": models}), problems


def _local_file(model: Model, base_dir: Path) -> Path | None:
    gguf_path = model.source.gguf
    if gguf_path is None or "://" in gguf_path:
        return None
    candidate = base_dir / gguf_path
    return candidate if candidate.is_file() else None


def read_arch(path: Path) -> dict[str, Any]:
    """Architecture numbers from a GGUF file or a Hugging Face config.json."""
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic == b"GGUF":
        return _from_gguf(path)
    return _from_config_json(path)


def _from_gguf(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader  # imported lazily: numpy-heavy and only needed here

    reader = GGUFReader(path)

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{path}: GGUF has no general.architecture")
    heads = value(f"{arch}.attention.head_count")
    kv_heads = value(f"{arch}.attention.head_count_kv") or heads
    width = value(f"{arch}.embedding_length")
    head_dim = value(f"{arch}.attention.key_length") or (width // heads if width and heads else None)
    params = sum(int(t.n_elements) for t in reader.tensors)
    out: dict[str, Any] = {
        "layers": value(f"{arch}.block_count"),
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "params_b": params / 1e9 if params else None,
        "weights_gib": path.stat().st_size / GIB,
    }
    return {k: v for k, v in out.items() if v is not None}


def _from_config_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: neither GGUF nor JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: config.json must be an object")
    config = config.get("text_config", config)  # multimodal configs nest the language model
    heads = config.get("num_attention_heads")
    width = config.get("hidden_size")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (width // heads if width and heads else None)
    layers = config.get("num_hidden_layers")
    out: dict[str, Any] = {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim}
    params = _dense_params(config, layers, heads, kv_heads, head_dim, width)
    if params:
        out["params_b"] = params / 1e9
    return {k: v for k, v in out.items() if v is not None}


def _dense_params(
    config: dict[str, Any], layers: Any, heads: Any, kv_heads: Any, head_dim: Any, width: Any
) -> int | None:
    """Parameter count of a dense decoder from its config; None for mixtures of experts.

    Embeddings (once if tied) + per layer: Q, K, V, O projections and a gated
    MLP (three matrices). Norms are negligible. An MoE's count depends on its
    expert layout, so it must be given in the spec.
    """
    if any(k in config for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        return None
    vocab = config.get("vocab_size")
    inter = config.get("intermediate_size")
    if not all(isinstance(x, int) for x in (vocab, inter, layers, heads, kv_heads, head_dim, width)):
        return None
    embed = vocab * width * (1 if config.get("tie_word_embeddings") else 2)
    attn = width * heads * head_dim * 2 + width * kv_heads * head_dim * 2
    mlp = 3 * width * inter
    return int(embed + layers * (attn + mlp))
