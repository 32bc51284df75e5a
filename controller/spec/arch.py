"""The 'defaults' phase: fill architecture numbers from local model files, and check them.

A model's VRAM estimate needs layers, KV heads, head dimension and the parameter count, and is tighter with
the width, heads, vocabulary and the weights' real size. They may be written in the spec, or read from a
local Hugging Face ``config.json`` or a GGUF file's metadata (``arch_from``, or the model's own GGUF source
when it is a local file); the same for a speculative draft (its local GGUF). Numbers in the spec win.

Then the checks that need those numbers: the requested context against the model's own maximum (RoPE
scaling is an explicit option), and a draft's tokenizer against the target's where the files tell.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.errors import Problem
from controller.spec.models import Arch, Fleet, Model, Source

ProblemAt = Callable[[tuple[str | int, ...], str], Problem]
GIB = 1024**3

# llama.cpp's own test of a draft against its target (common/speculative.cpp, common_speculative_are_compatible):
# the same tokenizer type and BOS/EOS, vocabularies at most 128 apart, the same text for every token from id 5.
SPEC_VOCAB_MAX_SIZE_DIFFERENCE = 128
SPEC_VOCAB_CHECK_START_TOKEN_ID = 5


def resolve_arch(fleet: Fleet, base_dir: Path, problem: ProblemAt) -> tuple[Fleet, list[Problem]]:
    problems: list[Problem] = []
    models: list[Model] = []
    for index, model in enumerate(fleet.models):
        where = ("models", index)
        found: dict[str, Any] = {}
        source_file = _local_gguf(model.source, base_dir)
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
        projector = _mmproj(model, base_dir)
        if projector is not None:
            found["projector_gib"] = projector
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
        problems += _check_context(model, arch, where, "max_context" in found and "max_context" not in given, problem)
        update: dict[str, Any] = {"arch": arch}
        if model.speculative is not None:
            draft_arch, draft_problems = _resolve_draft(model, arch, base_dir, source_file, where, problem)
            problems += draft_problems
            update["speculative"] = model.speculative.model_copy(update={"draft_arch": draft_arch})
        models.append(model.model_copy(update=update))
    return fleet.model_copy(update={"models": models}), problems


def _local_gguf(source: Source, base_dir: Path) -> Path | None:
    gguf_path = source.gguf
    if gguf_path is None or "://" in gguf_path:
        return None
    candidate = base_dir / gguf_path
    return candidate if candidate.is_file() else None


def _mmproj(model: Model, base_dir: Path) -> float | None:
    """A llama.cpp multimodal projector named in the options (`mmproj: FILE`): its size, when the file is local."""
    value = model.options.get("mmproj")
    if model.backend != "llamacpp" or not isinstance(value, str) or "://" in value:
        return None
    path = base_dir / value
    return path.stat().st_size / GIB if path.is_file() else None


def _check_context(
    model: Model, arch: Arch, where: tuple[str | int, ...], from_file: bool, problem: ProblemAt
) -> list[Problem]:
    """The requested context against the model's own maximum; RoPE scaling only when the spec asks for it."""
    if arch.max_context is None:
        return []
    factor = model.rope_scaling or 1.0
    allowed = int(arch.max_context * factor)
    if model.context <= allowed:
        return []
    origin = "read from the model's files" if from_file else "from `arch.max_context`"
    if model.rope_scaling is None:
        ratio = model.context / arch.max_context
        suggest = 2 ** math.ceil(math.log2(ratio))
        fix = (
            f"lower `context` to {arch.max_context} or less, or set `rope_scaling: {suggest}` to stretch the "
            "model's positions with RoPE scaling (YaRN; quality may drop beyond the trained length)"
        )
    else:
        fix = f"lower `context` to {allowed} or less, or raise `rope_scaling`"
    scaled = "" if model.rope_scaling is None else f" × rope_scaling {model.rope_scaling:g} = {allowed}"
    return [
        problem(
            (*where, "context"),
            f"model {model.name}: context {model.context} is beyond the model's own maximum of "
            f"{arch.max_context} tokens ({origin}){scaled}; {fix}",
        )
    ]


def _resolve_draft(
    model: Model,
    arch: Arch,
    base_dir: Path,
    target_file: Path | None,
    where: tuple[str | int, ...],
    problem: ProblemAt,
) -> tuple[Arch, list[Problem]]:
    spec = model.speculative
    assert spec is not None
    at = (*where, "speculative")
    problems: list[Problem] = []
    found: dict[str, Any] = {}
    draft_file = _local_gguf(spec.draft, base_dir) if spec.draft is not None else None
    if draft_file is not None:
        try:
            found = read_arch(draft_file)
        except (OSError, ValueError, KeyError) as exc:
            problems.append(problem((*at, "draft"), f"model {model.name}: cannot read the draft model: {exc}"))
    draft_arch = Arch(**{**found, **spec.draft_arch.model_dump(exclude_none=True)})
    if spec.method == "draft" and spec.draft is not None and draft_arch.missing():
        problems.append(
            problem(
                (*at, "draft_arch"),
                f"model {model.name}: unknown draft {', '.join(draft_arch.missing())}; give them under "
                "`speculative.draft_arch`, or make `speculative.draft` a local GGUF file",
            )
        )
    if spec.method == "draft" and spec.draft is not None:
        problems += _check_tokenizers(model, arch, draft_arch, target_file, draft_file, at, problem)
    return draft_arch, problems


def _check_tokenizers(
    model: Model,
    arch: Arch,
    draft_arch: Arch,
    target_file: Path | None,
    draft_file: Path | None,
    at: tuple[str | int, ...],
    problem: ProblemAt,
) -> list[Problem]:
    """The draft must speak the target's tokenizer: compared token by token when both are local GGUFs (llama.cpp's
    own rule), otherwise by vocabulary size where both are known."""
    target_name = str(target_file) if target_file is not None else f"model {model.name}"
    draft_name = str(draft_file) if draft_file is not None else "the draft"
    if target_file is not None and draft_file is not None:
        try:
            mismatch = tokenizer_mismatch(read_tokenizer(target_file), read_tokenizer(draft_file))
        except (OSError, ValueError, KeyError) as exc:
            return [problem((*at, "draft"), f"model {model.name}: cannot read the tokenizers: {exc}")]
        if mismatch:
            return [
                problem(
                    (*at, "draft"),
                    f"model {model.name}: the draft {draft_file} does not share the tokenizer of {target_file}: "
                    f"{mismatch}; use a draft of the same model family",
                )
            ]
        return []
    if arch.vocab_size is None or draft_arch.vocab_size is None:
        return []
    gap = abs(arch.vocab_size - draft_arch.vocab_size)
    # vLLM scores the draft's tokens with the target's logits: the vocabularies must be the same size.
    allowed = 0 if model.backend == "vllm" else SPEC_VOCAB_MAX_SIZE_DIFFERENCE
    if gap <= allowed:
        return []
    return [
        problem(
            (*at, "draft_arch"),
            f"model {model.name}: the draft's vocabulary ({draft_arch.vocab_size} tokens, {draft_name}) differs from "
            f"the target's ({arch.vocab_size}, {target_name}) by {gap}"
            + (f", more than {allowed}" if allowed else "")
            + "; use a draft of the same model family",
        )
    ]


# -- reading files ------------------------------------------------------------------------


def read_arch(path: Path) -> dict[str, Any]:
    """Architecture numbers from a GGUF file or a Hugging Face config.json."""
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic == b"GGUF":
        return _from_gguf(path)
    return _from_config_json(path)


def _gguf_value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _from_gguf(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader  # imported lazily: numpy-heavy and only needed here

    reader = GGUFReader(path)

    def value(key: str) -> Any:
        return _gguf_value(reader, key)

    arch = value("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{path}: GGUF has no general.architecture")
    heads = value(f"{arch}.attention.head_count")
    if isinstance(heads, list):  # per-layer head counts (some hybrid models): the largest
        heads = max(heads) or None
    kv_heads = value(f"{arch}.attention.head_count_kv")
    if isinstance(kv_heads, list):
        kv_heads = max(kv_heads) or None
    kv_heads = kv_heads or heads
    width = value(f"{arch}.embedding_length")
    head_dim = value(f"{arch}.attention.key_length") or (width // heads if width and heads else None)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = value(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    # llama.cpp keeps the input embeddings in system memory ("there is very little benefit to offloading the
    # input layer", llama-model.cpp); with tied embeddings it puts a copy on the GPU as the output layer.
    gpu_bytes = sum(int(t.n_bytes) for t in reader.tensors if tied or t.name != "token_embd.weight")
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    params = sum(int(t.n_elements) for t in reader.tensors)
    out: dict[str, Any] = {
        "layers": value(f"{arch}.block_count"),
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "heads": heads,
        "hidden_size": width,
        "vocab_size": vocab,
        "tied_embeddings": tied,
        "max_context": value(f"{arch}.context_length"),
        "params_b": params / 1e9 if params else None,
        "weights_gib": gpu_bytes / GIB if gpu_bytes else None,
        "tensor_types": types or None,
    }
    return {k: v for k, v in out.items() if v is not None}


def read_tokenizer(path: Path) -> dict[str, Any]:
    """What llama.cpp compares between a draft and its target: tokenizer type, BOS/EOS, the tokens' text."""
    from gguf import GGUFReader

    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
    reader = GGUFReader(path)
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise ValueError(f"{path}: GGUF has no tokenizer.ggml.tokens")
    return {
        "model": _gguf_value(reader, "tokenizer.ggml.model"),
        "bos": _gguf_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos": _gguf_value(reader, "tokenizer.ggml.eos_token_id"),
        "add_bos": _gguf_value(reader, "tokenizer.ggml.add_bos_token"),
        "add_eos": _gguf_value(reader, "tokenizer.ggml.add_eos_token"),
        "tokens": tokens,
    }


def tokenizer_mismatch(target: dict[str, Any], draft: dict[str, Any]) -> str | None:
    """Why llama.cpp would refuse ``draft`` for ``target`` (common_speculative_are_compatible), or None."""
    if target["model"] != draft["model"]:
        return f"tokenizer type {draft['model']!r} vs {target['model']!r}"
    for key, label in (("bos", "BOS token"), ("eos", "EOS token"), ("add_bos", "add-BOS"), ("add_eos", "add-EOS")):
        # A key one file leaves out takes the tokenizer type's default in llama.cpp: compare only what both say.
        if target[key] is not None and draft[key] is not None and target[key] != draft[key]:
            return f"{label} {draft[key]!r} vs {target[key]!r}"
    t_tokens, d_tokens = target["tokens"], draft["tokens"]
    gap = abs(len(t_tokens) - len(d_tokens))
    if gap > SPEC_VOCAB_MAX_SIZE_DIFFERENCE:
        return (
            f"vocabulary of {len(d_tokens)} tokens vs {len(t_tokens)}, {gap} apart "
            f"(llama.cpp allows {SPEC_VOCAB_MAX_SIZE_DIFFERENCE})"
        )
    for token_id in range(SPEC_VOCAB_CHECK_START_TOKEN_ID, min(len(t_tokens), len(d_tokens))):
        if t_tokens[token_id] != d_tokens[token_id]:
            return f"token {token_id} is {d_tokens[token_id]!r} vs {t_tokens[token_id]!r}"
    return None


def _from_config_json(path: Path) -> dict[str, Any]:
    try:
        top = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: neither GGUF nor JSON ({exc})") from None
    if not isinstance(top, dict):
        raise ValueError(f"{path}: config.json must be an object")
    config = top.get("text_config", top)  # multimodal configs nest the language model
    if not isinstance(config, dict):
        raise ValueError(f"{path}: text_config must be an object")
    heads = config.get("num_attention_heads")
    width = config.get("hidden_size")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (width // heads if width and heads else None)
    layers = config.get("num_hidden_layers")
    vocab = config.get("vocab_size") or top.get("vocab_size")
    tied = config.get("tie_word_embeddings", top.get("tie_word_embeddings"))
    out: dict[str, Any] = {
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "heads": heads,
        "hidden_size": width,
        "vocab_size": vocab,
        "tied_embeddings": tied if isinstance(tied, bool) else None,
        "max_context": _max_context(config),
    }
    params = _dense_params(config, layers, heads, kv_heads, head_dim, width)
    if params:
        out["params_b"] = params / 1e9
    vision = top.get("vision_config")
    if isinstance(vision, dict):
        vision_params = _vision_params(vision, width)
        if vision_params:
            out["projector_gib"] = vision_params * 2 / GIB  # 16-bit, as vLLM loads it
    return {k: v for k, v in out.items() if v is not None}


def _max_context(config: dict[str, Any]) -> int | None:
    """The longest context the checkpoint supports, as vLLM derives it (_get_and_verify_max_len): the position
    embeddings, times a rope_scaling factor the config declares itself (except for types whose length is already
    the extended one)."""
    length = None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            length = config[key]
            break
    if length is None:
        return None
    rope = config.get("rope_scaling")
    if isinstance(rope, dict):
        kind = rope.get("rope_type", rope.get("type"))
        factor = rope.get("factor", 1.0)
        if kind not in ("su", "longrope", "llama3", "default", "mrope") and isinstance(factor, int | float):
            if kind == "yarn" and isinstance(rope.get("original_max_position_embeddings"), int):
                length = rope["original_max_position_embeddings"]
            length = int(length * factor)
    return int(length)


def _vision_params(vision: dict[str, Any], text_width: Any) -> int | None:
    """Parameters of a ViT vision tower: per block 4·w² (attention) + 2·w·i (MLP), plus a projector to the text
    width (two matrices at most)."""
    layers = vision.get("num_hidden_layers") or vision.get("depth")
    width = vision.get("hidden_size") or vision.get("embed_dim")
    inter = vision.get("intermediate_size")
    if inter is None and isinstance(width, int) and isinstance(vision.get("mlp_ratio"), int | float):
        inter = int(width * vision["mlp_ratio"])
    if not (isinstance(layers, int) and isinstance(width, int) and isinstance(inter, int)):
        return None
    blocks = layers * (4 * width * width + 2 * width * inter)
    projector = 2 * width * text_width if isinstance(text_width, int) else 0
    return int(blocks + projector)


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
