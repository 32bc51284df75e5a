"""VRAM estimate of one replica, per GPU, term by term, never below what the backend allocates.

Terms (every one in GiB, ``total_gib`` their sum):

- weights: what the GPU holds of the checkpoint. AWQ/GPTQ/FP8 checkpoints keep their embeddings and output
  layer in 16 bits; a local GGUF is counted tensor by tensor at its own types (controller/spec/arch.py).
- KV cache: 2 (K and V) × layers × KV heads × head dim × tokens × bytes per element, sized so that every
  slot holds a full context at once (the backends are configured to allocate exactly that).
- compute: vLLM's activation peak during its profiling run; llama.cpp's and Ollama's compute buffer, which
  grows with the vocabulary (logits) and, without flash attention, with the context (attention scores).
- graphs: vLLM's CUDA graphs, captured after the KV cache is sized, so outside `--gpu-memory-utilization`.
- draft: speculative decoding's draft model: weights, its own KV cache, its compute buffers.
- overhead: the CUDA context and runtime buffers each GPU pays once.

Each figure below names where it comes from: the backend's own code or a published log of a real model.
tests/unit/test_vram.py checks the estimate against published allocations of real models.

Architecture numbers the spec or the model files leave out are assumed on the safe side (the basis says so):
width and heads from the parameter count, the largest common vocabulary.

With tensor parallelism (vLLM) the weights and the KV heads are split across the replica's GPUs; the other
terms are paid on each GPU. llama.cpp and Ollama replicas never span GPUs (`--split-mode none`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from controller.plan.models import Estimate
from controller.spec.models import Arch, Model

GIB = 1024**3
# The memory a backend really took (NVML, per process) may miss the estimate by this much either way before it is a
# warning (controller/agent/memory.py measures; the alert FleetWorkerMemoryOffEstimate and the console say it).
MISS_WARN_RATIO = 0.10
MIB = 1024**2

# -- weights ------------------------------------------------------------------------

# GGUF bits per weight of a whole file (output layer and norms at their own types), used when no local file
# tells the exact size: the highest llama.cpp's loader printed (`model size = … GiB (N BPW)`, public logs) for
# models of each type:
BITS_PER_WEIGHT = {
    # Pythia-1.4B Q4_0: 786.31 MiB (4.66 BPW); Llama-3.1-70B Q4_0: 37.22 GiB (4.53 BPW), ollama/ollama#6279.
    "q4_0": 4.66,
    # Phi-3-mini (3.82B) Q4_K_M: 2.23 GiB (5.01 BPW); Phi-4: 8.43 GiB (4.94); Llama-3.1-8B: 4.58 GiB (4.89,
    # the 4.92 GB file of bartowski/Meta-Llama-3.1-8B-Instruct-GGUF).
    "q4_k_m": 5.01,
    # StarCoder-15B Q5_K_M: 10.90 GiB (5.92 BPW); Gemma-2-2B: 1.79 GiB (5.87); Mistral-7B: 4.78 GiB (5.67).
    "q5_k_m": 5.92,
    # A 1.18B model Q6_K: 944.39 MiB (6.73 BPW); Llama-3-8B: 6.14 GiB (6.56).
    "q6_k": 6.73,
    # 34 bytes per block of 32 (ggml Q8_0); Llama-3-8B Q8_0: 7.95 GiB (8.50 BPW), argilla-io/distilabel#593.
    "q8_0": 8.50,
    "f16": 16.0,
}
# vLLM quantized checkpoints, the quantized linear layers only: AWQ and GPTQ store 4-bit weights plus an fp16
# scale and a 4-bit zero point per group of 128 (4 + 20/128 = 4.16 bits; GPTQ's act-order index adds a little);
# FP8 one byte per weight plus per-channel or per-tensor scales.
VLLM_QUANT_BITS = {"awq": 4.25, "gptq": 4.25, "fp8": 8.0}
DTYPE_BITS = {"auto": 16.0, "float16": 16.0, "bfloat16": 16.0, "float32": 32.0}
# Ollama's default tags are Q4_K_M; "none" means the tag's own quantization.
OLLAMA_DEFAULT_QUANT = "q4_k_m"
# Share of the parameters in the input embeddings and output layer, which AWQ/GPTQ/FP8 checkpoints keep in
# 16 bits, when vocab_size and hidden_size are unknown: the largest share among common models of each size
# (vocab × width, twice when untied, from their config.json):
EMBED_SHARE = (
    (2.0, 0.28),  # Qwen2.5-0.5B: 151936 × 896, tied: 136M of 494M (27.5%)
    (5.0, 0.18),  # Gemma-3-4B: 262144 × 2560, tied: 671M of 3.88B (17.3%); Llama-3.2-3B 12.3%
    (10.0, 0.15),  # Qwen2.5-7B: 152064 × 3584 × 2: 1.09B of 7.62B (14.3%); Llama-3.1-8B 13.1%
    (20.0, 0.11),  # Qwen2.5-14B: 152064 × 5120 × 2: 1.56B of 14.8B (10.5%)
    (50.0, 0.055),  # Gemma-3-27B: 262144 × 5376, tied: 1.41B of 27.4B (5.1%); Qwen2.5-32B 4.7%
    (math.inf, 0.04),  # Qwen2.5-72B: 152064 × 8192 × 2: 2.49B of 72.7B (3.4%); Llama-3.3-70B 3.0%
)

# -- KV cache -------------------------------------------------------------------------

# Bytes per element: ggml's q8_0 is 34 bytes per 32 values, q4_0 18 per 32.
KV_BYTES = {"float16": 2.0, "bfloat16": 2.0, "fp8": 1.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
# llama.cpp pads the KV cache to a multiple of 256 cells (llama_kv_cache: 256 with flash attention, 32 without;
# the larger is taken).
LLAMACPP_KV_PAD = 256
# llama.cpp's draft model keeps an f16 KV cache unless --cache-type-k-draft/-v-draft say otherwise.
DRAFT_KV_BYTES_LLAMACPP = 2.0

# -- compute ----------------------------------------------------------------------------

# llama.cpp's micro-batch (`--ubatch-size`, default 512); Ollama's num_batch, default 512.
LLAMACPP_UBATCH = 512
# When the spec and the files give no vocabulary: Gemma 3's 262144 tokens, the largest common one.
DEFAULT_VOCAB = 262_144
# vLLM's activation peak in its profiling run: Meta-Llama-3-8B (8.03B params, 32 layers) at 8192 batched
# tokens took 1.26 GiB ("PyTorch activation peak memory 1.26GiB", at TP 1 and TP 2 alike, vllm-project/vllm#10511).
# 8192 is `vllm serve`'s default --max-num-batched-tokens on GPUs of 70 GiB or more (2048 below), so the figure
# holds on every GPU; it is scaled by the square root of the parameters per layer (activations grow with the
# width and the MLP's, the parameters per layer with their product).
VLLM_ACTIVATION_GIB = 1.26
VLLM_ACTIVATION_PARAMS_PER_LAYER_B = 8.03 / 32
VLLM_BATCHED_TOKENS = 8192
# vLLM's CUDA graphs: "CUDA graphs can take additional 1~3 GiB memory per GPU" (vLLM's own warning when it
# captures them, vllm/worker/model_runner.py); logged captures took 0.21 GiB (Llama-3.2-1B, vllm-project/vllm#11349)
# to 1.64 GiB (a TP-4 MoE, vllm-project/vllm#25848). The low end for models up to 15B parameters per GPU, the top
# above 40B.
VLLM_GRAPHS_GIB = ((15.0, 1.0), (40.0, 2.0), (math.inf, 3.0))
# vLLM captures batch sizes up to min(2 × max_num_seqs, 512) (`cuda_graph_sizes`' default, vllm/config); with few
# slots only a handful ([1, 2, 4, 8] for 4): "Profiling CUDA graph memory: PIECEWISE=16 (largest=16) … Estimated CUDA
# graph memory: 0.36 GiB total" (gpustack/runner#251). Up to 16, half the figure above.
VLLM_FEW_GRAPHS_MAX_SIZE = 16
VLLM_FEW_GRAPHS_FACTOR = 0.5

# -- overhead ---------------------------------------------------------------------------

# vLLM: the CUDA context, created before vLLM measures its baseline, so outside the utilization fraction
# ("Clean vLLM memory usage before model loading is ~400mb on each GPU", Sandermage/genesis-vllm-patches#24);
# and memory outside PyTorch's allocator after load (cuBLAS workspaces; NCCL and the custom all-reduce with
# tensor parallelism), inside it: "non_torch_memory takes 0.16GiB" on one H100 (vllm-project/vllm#12126, and
# kubernetes-sigs/gateway-api-inference-extension#550), 0.20 GiB with four TP workers on 24 GB cards
# (vllm-project/vllm#14447), 0.73 GiB at TP 2 (Gemma-3-27B AWQ on ROCm, nlzy/vllm-gfx906#10). Twice the one-GPU
# figure; with TP the largest.
VLLM_CUDA_CONTEXT_GIB = 0.5
VLLM_NON_TORCH_GIB = 0.4
VLLM_NON_TORCH_TP_GIB = 0.75
# A sleeping vLLM worker (level 1) frees its weights and KV cache and keeps the rest: "Sleep mode freed
# 23.74 GiB memory, 4.75 GiB memory is still in use" (vllm-project/vllm#17117); 3.94 GiB for Qwen2.5-0.5B
# (vllm-project/vllm#46203). The larger of that and the terms it keeps.
VLLM_SLEEP_RESIDUE_MIN_GIB = 4.75
# llama.cpp: CUDA context, cuBLAS handles and the CUDA memory pool. Ollama reserves 457 MiB per CUDA GPU for the
# same engine's runtime (cudaMinimumMemory, ollama/ollama discover/gpu.go); rounded up.
LLAMACPP_RUNTIME_GIB = 0.5
OLLAMA_MINIMUM_GIB = 457 * MIB / GIB


@dataclass(frozen=True)
class Dims:
    """Architecture numbers of one model, the missing ones assumed on the safe side (named in ``assumed``)."""

    layers: int
    kv_heads: int
    head_dim: int
    params_b: float
    heads: int
    hidden: int
    vocab: int
    tied: bool
    assumed: tuple[str, ...]


def dims(arch: Arch) -> Dims:
    assert arch.layers and arch.kv_heads and arch.head_dim and arch.params_b, "arch resolved by the spec loader"
    assumed: list[str] = []
    hidden = arch.hidden_size
    if hidden is None:
        # A dense decoder has about 12 × layers × width² parameters (4w² attention, 8w² MLP); +10% covers wider
        # MLPs (Qwen2.5-14B: the formula gives 5069 for its 5120).
        hidden = math.ceil(1.1 * math.sqrt(arch.params_b * 1e9 / (12 * arch.layers)))
        if arch.heads:
            hidden = max(hidden, arch.heads * arch.head_dim)
        assumed.append(f"width {hidden} (from params_b and layers)")
    heads = arch.heads
    if heads is None:
        heads = max(arch.kv_heads, math.ceil(hidden / arch.head_dim))
        assumed.append(f"{heads} attention heads (width / head dim)")
    vocab = arch.vocab_size
    if vocab is None:
        vocab = DEFAULT_VOCAB
        assumed.append(f"vocabulary {vocab} (the largest common one)")
    return Dims(
        arch.layers,
        arch.kv_heads,
        arch.head_dim,
        arch.params_b,
        heads,
        hidden,
        vocab,
        bool(arch.tied_embeddings),
        tuple(assumed),
    )


def estimate(model: Model) -> Estimate:
    """The memory one replica of ``model`` needs on each of its GPUs."""
    if model.backend == "vllm":
        return _vllm(model)
    return _ggml(model)


# -- vLLM ----------------------------------------------------------------------------------


def _vllm(model: Model) -> Estimate:
    d = dims(model.arch)
    tp = model.gpus_per_replica
    split = f", split over {tp} GPUs" if tp > 1 else ""
    weights_total, weights_basis = _vllm_weights(model, d)
    projector = model.arch.projector_gib or 0.0
    weights = weights_total / tp + projector
    if projector:
        weights_basis += f" + {projector:.2f} GiB vision encoder (not split)"
    kv_bytes, kv_name = _vllm_kv_bytes(model)
    kv_heads = max(1.0, d.kv_heads / tp)  # vLLM replicates KV heads when there are fewer than GPUs
    kv = 2 * d.layers * kv_heads * d.head_dim * model.context * model.parallel * kv_bytes / GIB
    scale = math.sqrt(d.params_b / d.layers / VLLM_ACTIVATION_PARAMS_PER_LAYER_B)
    tokens = vllm_batched_tokens(model)
    compute = VLLM_ACTIVATION_GIB * scale * tokens / VLLM_BATCHED_TOKENS
    graphs = next(g for limit, g in VLLM_GRAPHS_GIB if d.params_b / tp <= limit)
    # Decode steps of 1 + the speculated tokens per sequence widen the captured batches.
    capture = min(2 * model.parallel * (1 + (model.speculative.tokens if model.speculative else 0)), 512)
    if capture <= VLLM_FEW_GRAPHS_MAX_SIZE:
        graphs *= VLLM_FEW_GRAPHS_FACTOR
    non_torch = VLLM_NON_TORCH_TP_GIB if tp > 1 else VLLM_NON_TORCH_GIB
    overhead = VLLM_CUDA_CONTEXT_GIB + non_torch
    draft, draft_basis = _vllm_draft(model, d, weights_total, kv_bytes)
    basis = {
        "weights": weights_basis + split,
        "kv_cache": (
            f"2 × {d.layers} layers × {kv_heads:g} kv heads{' per GPU' if tp > 1 else ''} × {d.head_dim} head dim × "
            f"{model.context} ctx × {model.parallel} slots × {kv_bytes:g} B ({kv_name})"
        ),
        "compute": (
            f"activation peak of vLLM's profiling run at {tokens} batched tokens: 1.26 GiB for an 8B/32-layer "
            f"model at {VLLM_BATCHED_TOKENS} × {scale:.2f} (√ params per layer)"
            + (f" × {tokens}/{VLLM_BATCHED_TOKENS}" if tokens != VLLM_BATCHED_TOKENS else "")
        ),
        "graphs": (
            f"CUDA graphs for {d.params_b / tp:g}B params per GPU, batches up to {capture} "
            "(outside --gpu-memory-utilization)"
        ),
        "overhead": (
            f"CUDA context {VLLM_CUDA_CONTEXT_GIB:g} (outside --gpu-memory-utilization) + cuBLAS"
            f"{'/NCCL' if tp > 1 else ''} {non_torch:g} per GPU"
        ),
    }
    if draft_basis:
        basis["draft"] = draft_basis
    return _finish(
        model,
        basis,
        (),  # width, heads and vocabulary do not enter vLLM's terms (the embeddings' share says so itself)
        weights=weights,
        kv=kv,
        compute=compute,
        graphs=graphs,
        draft=draft,
        overhead=overhead,
        outside=VLLM_CUDA_CONTEXT_GIB + graphs,
    )


def vllm_batched_tokens(model: Model) -> int:
    """Tokens of vLLM's profiling run, which the activation term assumes: `max-num-batched-tokens` from the
    options, else vLLM's largest default (8192), no more than every slot's full context (vLLM caps its default at
    max_num_seqs × max_model_len). An adapter that passes `--max-num-batched-tokens` should pass this."""
    value = model.options.get("max-num-batched-tokens")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return min(VLLM_BATCHED_TOKENS, model.context * model.parallel)


def _vllm_weights(model: Model, d: Dims) -> tuple[float, str]:
    arch = model.arch
    if arch.weights_gib is not None:
        return arch.weights_gib, f"{arch.weights_gib:.2f} GiB of weights (spec)"
    quant = model.quantization
    if quant == "none" or quant not in VLLM_QUANT_BITS:
        bits = DTYPE_BITS[model.dtype]
        label = "16-bit (auto)" if model.dtype == "auto" else model.dtype
        return d.params_b * 1e9 * bits / 8 / GIB, f"{d.params_b:g}B params × {bits:g} bits ({label})"
    embed, embed_label = _embedding_params(arch, d)
    body_bits = VLLM_QUANT_BITS[quant]
    size = ((d.params_b * 1e9 - embed) * body_bits / 8 + embed * 2) / GIB
    return size, (
        f"{(d.params_b * 1e9 - embed) / 1e9:.2f}B params × {body_bits:g} bits ({quant}) + {embed / 1e9:.2f}B "
        f"embedding/output params × 16 bits ({embed_label})"
    )


def _embedding_params(arch: Arch, d: Dims) -> tuple[float, str]:
    if arch.vocab_size and arch.hidden_size:
        copies = 1 if arch.tied_embeddings else 2
        return float(arch.vocab_size * arch.hidden_size * copies), (
            f"{arch.vocab_size} vocab × {arch.hidden_size} width{'' if copies == 1 else ' × 2 (untied)'}"
        )
    share = next(s for limit, s in EMBED_SHARE if d.params_b < limit)
    return d.params_b * 1e9 * share, f"assumed {share:.0%} of the params; give arch.vocab_size and hidden_size"


def _vllm_kv_bytes(model: Model) -> tuple[float, str]:
    kv = model.kv_cache_dtype
    if kv == "auto":
        if model.dtype == "float32":
            return 4.0, "float32"
        return 2.0, "16-bit"
    return KV_BYTES[kv], kv


def _vllm_draft(model: Model, d: Dims, weights_total: float, kv_bytes: float) -> tuple[float, str]:
    """vLLM loads a draft (or the MTP layers) in the same process: its weights and its layers' KV cache come out
    of the same utilization budget as the target's; its activations and graphs are assumed within the target's
    figures (both are upper bounds)."""
    spec = model.speculative
    if spec is None or spec.method == "ngram":
        return 0.0, ""
    tp = model.gpus_per_replica
    arch = spec.draft_arch
    if spec.method == "mtp" and arch.missing():
        # The model's own multi-token-prediction module: one more decoder layer (num_nextn_predict_layers is 1 in
        # DeepSeek-V3 and Qwen3-Next), sharing the embeddings and output layer.
        weights = weights_total / d.layers / tp
        kv = 2 * max(1.0, d.kv_heads / tp) * d.head_dim * model.context * model.parallel * kv_bytes / GIB
        return weights + kv, f"MTP: one more layer, {weights:.2f} GiB weights + {kv:.2f} GiB KV cache"
    if arch.missing():
        return 0.0, ""  # the spec check names the missing numbers
    dd = dims(arch)
    weights = (arch.weights_gib or dd.params_b * 1e9 * DTYPE_BITS[model.dtype] / 8 / GIB) / tp
    kv = 2 * dd.layers * max(1.0, dd.kv_heads / tp) * dd.head_dim * model.context * model.parallel * kv_bytes / GIB
    return weights + kv, (
        f"draft {dd.params_b:g}B params: {weights:.2f} GiB weights + KV 2 × {dd.layers} layers × {dd.kv_heads} kv "
        f"heads × {dd.head_dim} × {model.context} ctx × {model.parallel} slots ({kv:.2f} GiB)"
    )


# -- llama.cpp and Ollama --------------------------------------------------------------------------


def _ggml(model: Model) -> Estimate:
    d = dims(model.arch)
    ollama = model.backend == "ollama"
    weights, weights_basis = _ggml_weights(model, d)
    projector = model.arch.projector_gib or 0.0
    if projector:
        weights += projector
        weights_basis += f" + {projector:.2f} GiB multimodal projector"
    cells = _pad(model.context * model.parallel)
    kv_bytes, kv_name = _ggml_kv_bytes(model)
    kv = 2 * d.layers * d.kv_heads * d.head_dim * cells * kv_bytes / GIB
    quantized_kv = model.kv_cache_dtype in ("q8_0", "q4_0")
    # Ollama decides how many layers fit from its own estimate, which books the attention scores of a whole
    # context whatever flash attention does (ollama/ollama llm/memory.go, fs/ggml GraphSize): the plan books it
    # too, or Ollama would leave layers on the CPU.
    flash = False if ollama else (model.flash_attention or quantized_kv)
    ubatch = _ubatch(model)
    compute, compute_basis = _compute_buffer(d, cells, ubatch, flash, quantized_kv)
    if ollama:
        buffer = weights / d.layers + kv / d.layers
        overhead = OLLAMA_MINIMUM_GIB + buffer
        overhead_basis = f"Ollama's 457 MiB per GPU + the extra layer it books as a buffer ({buffer:.2f} GiB)"
    else:
        overhead = LLAMACPP_RUNTIME_GIB
        overhead_basis = "CUDA context, cuBLAS and the CUDA memory pool"
    draft, draft_basis = _ggml_draft(model, flash)
    basis = {
        "weights": weights_basis,
        "kv_cache": (
            f"2 × {d.layers} layers × {d.kv_heads} kv heads × {d.head_dim} head dim × {cells} cells "
            f"({model.context} ctx × {model.parallel} slots, padded to {LLAMACPP_KV_PAD}) × {kv_bytes:g} B ({kv_name})"
        ),
        "compute": compute_basis,
        "overhead": overhead_basis,
    }
    if draft_basis:
        basis["draft"] = draft_basis
    return _finish(model, basis, d.assumed, weights=weights, kv=kv, compute=compute, draft=draft, overhead=overhead)


def _ggml_weights(model: Model, d: Dims) -> tuple[float, str]:
    arch = model.arch
    if arch.weights_gib is not None:
        if arch.tensor_types:
            types = ", ".join(f"{k} ×{v}" for k, v in sorted(arch.tensor_types.items()))
            return arch.weights_gib, f"{arch.weights_gib:.2f} GiB of GGUF tensors on the GPU ({types})"
        return arch.weights_gib, f"{arch.weights_gib:.2f} GiB of weights (spec)"
    quant: str = model.quantization
    if quant == "none":
        quant = OLLAMA_DEFAULT_QUANT if model.backend == "ollama" else "f16"
    bits = BITS_PER_WEIGHT[quant]
    label = f"{quant}, Ollama's default tag" if model.quantization == "none" and model.backend == "ollama" else quant
    return d.params_b * 1e9 * bits / 8 / GIB, f"{d.params_b:g}B params × {bits:g} bits per weight ({label})"


def _ggml_kv_bytes(model: Model) -> tuple[float, str]:
    kv = model.kv_cache_dtype
    if kv in ("auto", "float16", "bfloat16"):
        return 2.0, "f16"
    return KV_BYTES[kv], kv


def _pad(cells: int) -> int:
    return -(-cells // LLAMACPP_KV_PAD) * LLAMACPP_KV_PAD


def _ubatch(model: Model) -> int:
    if model.backend == "llamacpp":
        for key in ("ubatch-size", "ub"):
            value = model.options.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return LLAMACPP_UBATCH


def _compute_buffer(d: Dims, cells: int, ubatch: int, flash: bool, quantized_kv: bool) -> tuple[float, str]:
    """llama.cpp's compute buffer for a micro-batch of ``ubatch`` tokens over ``cells`` of KV cache.

    Its largest moment is either the attention of one layer or the output layer. Without flash attention the
    attention holds f32 scores for every head, token and cell, plus the embeddings: 4 × ubatch × (1 + 4·width +
    cells·(1 + heads)) bytes, Ollama's formula for llama models (ollama/ollama fs/ggml GraphSize), which matches
    llama.cpp's logs exactly (Mistral-7B at 32768 cells: 2144.00 MiB, fedora-copr/logdetective#106). The output
    layer holds f32 logits, 4 × ubatch × (width + vocab) bytes (Llama-3-8B at 512 cells: 258.50 MiB), beside
    the KV mask, an input kept through the whole graph (f32, f16 with flash attention). With flash attention the
    scores are never materialized; with a quantized cache CUDA's flash attention converts one layer's K and V to
    f16 in its memory pool.
    """
    mask = (2 if flash else 4) * ubatch * cells
    output = 4 * ubatch * (d.hidden + d.vocab)
    if flash:
        attention = 4 * ubatch * (1 + 4 * d.hidden)
        convert = 2 * cells * d.kv_heads * d.head_dim * 2 if quantized_kv else 0
        size = max(attention, output) + mask + convert
        how = (
            f"flash attention: max(embeddings, logits 4 × {ubatch} × ({d.hidden} width + {d.vocab} vocab)) + f16 mask "
            f"of {cells} cells" + (" + f16 copy of one layer's K and V" if convert else "")
        )
    else:
        attention = 4 * ubatch * (1 + 4 * d.hidden + cells * (1 + d.heads))
        size = max(attention, output + mask)
        how = (
            f"no flash attention: max(scores 4 × {ubatch} × (1 + 4 × {d.hidden} + {cells} cells × (1 + {d.heads} "
            f"heads)), logits 4 × {ubatch} × ({d.hidden} + {d.vocab} vocab) + mask)"
        )
    return size / GIB, how


def _ggml_draft(model: Model, flash: bool) -> tuple[float, str]:
    """llama-server loads the draft once and gives every slot a draft context of its own (tools/server: one
    `ctx_dft` per slot, n_ctx = the slot's context): its KV cache (f16 by default) and compute buffer, per slot."""
    spec = model.speculative
    if spec is None or spec.method != "draft" or spec.draft_arch.missing():
        return 0.0, ""
    arch = spec.draft_arch
    dd = dims(arch)
    if arch.weights_gib is not None:
        weights = arch.weights_gib
    else:
        quant = model.quantization if model.quantization != "none" else "f16"
        weights = dd.params_b * 1e9 * BITS_PER_WEIGHT.get(quant, 16.0) / 8 / GIB
    cells = _pad(model.context)
    kv = 2 * dd.layers * dd.kv_heads * dd.head_dim * cells * DRAFT_KV_BYTES_LLAMACPP / GIB
    compute, _ = _compute_buffer(dd, cells, LLAMACPP_UBATCH, flash, False)
    total = weights + model.parallel * (kv + compute)
    return total, (
        f"draft {dd.params_b:g}B params: {weights:.2f} GiB weights + {model.parallel} slots × (f16 KV {kv:.2f} + "
        f"compute {compute:.2f} GiB for {cells} cells)"
    )


# -- the estimate ---------------------------------------------------------------------------------


def _finish(
    model: Model,
    basis: dict[str, str],
    assumed: tuple[str, ...],
    *,
    weights: float,
    kv: float,
    compute: float,
    overhead: float,
    graphs: float = 0.0,
    draft: float = 0.0,
    outside: float = 0.0,
) -> Estimate:
    # Each term rounded up to the MiB-ish third decimal, so that rounding never takes a byte off.
    terms = {
        name: _up(value)
        for name, value in (("w", weights), ("k", kv), ("c", compute), ("g", graphs), ("d", draft), ("o", overhead))
    }
    total = round(sum(terms.values()), 3)
    if assumed:
        basis["assumed"] = "; ".join(assumed) + " — give them under `arch` for a tighter figure"
    residue = None
    if model.backend == "vllm" and (model.swap is None or model.swap.unload != "stop"):
        kept = terms["o"] + terms["g"] + terms["c"]
        residue = round(min(total, max(VLLM_SLEEP_RESIDUE_MIN_GIB, kept)), 3)
    outside = _up(outside)
    return Estimate(
        weights_gib=terms["w"],
        kv_cache_gib=terms["k"],
        compute_gib=terms["c"],
        graphs_gib=terms["g"],
        draft_gib=terms["d"],
        overhead_gib=terms["o"],
        total_gib=total,
        outside_utilization_gib=outside,
        sleep_residue_gib=residue,
        basis=basis,
    )


def _up(gib: float) -> float:
    """``gib`` rounded up to three decimals (a float's noise below 1e-9 ignored)."""
    return math.ceil(round(gib * 1000, 6)) / 1000


def gib_pair(a: float, b: float) -> tuple[str, str]:
    """Two GiB figures with just enough decimals (at least 2) that they differ when ``a != b``."""
    for digits in range(2, 18):
        sa, sb = f"{a:.{digits}f}", f"{b:.{digits}f}"
        if sa != sb or a == b:
            return sa, sb
    return repr(a), repr(b)


# -- what would make it fit ---------------------------------------------------------------------------


def fit_hints(model: Model, free_gib: float) -> list[str]:
    """Changes of the model's settings, valid for its backend, that would make one replica fit in ``free_gib``
    per GPU, each with the total it would then need: fewer slots, a quantized KV cache, flash attention, a
    shorter context, more GPUs (vLLM); if no single change does, the shortest path combined."""

    def total(**update: object) -> float:
        return estimate(model.model_copy(update=update)).total_gib

    def line(label: str, gib: float) -> str:
        return f"{label}: {gib:.2f} GiB"

    out: list[str] = []
    if model.parallel > 1:
        fitting = [p for p in range(model.parallel - 1, 0, -1) if total(parallel=p) <= free_gib]
        if fitting:
            out.append(line(f"parallel {fitting[0]}", total(parallel=fitting[0])))
    compact_kv = _compact_kv(model)
    for kv in compact_kv:
        if total(kv_cache_dtype=kv) <= free_gib:
            out.append(line(f"kv_cache_dtype {kv}", total(kv_cache_dtype=kv)))
            break
    flash = model.backend == "llamacpp" and not model.flash_attention
    if flash and total(flash_attention=True) <= free_gib:
        out.append(line("flash_attention true", total(flash_attention=True)))
    context = _longest_context(model, free_gib, {})
    if context is not None:
        out.append(line(f"context {context}", total(context=context)))
    if model.backend == "vllm" and model.gpus_per_replica < 8:
        tp = model.gpus_per_replica * 2
        if total(gpus_per_replica=tp) <= free_gib:
            out.append(line(f"gpus_per_replica {tp}", total(gpus_per_replica=tp)) + " per GPU")
    if out:
        return out
    # No single change: fewest slots, the most compact KV cache, flash attention, and the longest context then.
    update: dict[str, object] = {"parallel": 1}
    if compact_kv:
        update["kv_cache_dtype"] = compact_kv[-1]
    if flash:
        update["flash_attention"] = True
    context = _longest_context(model, free_gib, update)
    if context is None:
        return []
    labels = [
        f"{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in update.items() if getattr(model, k) != v
    ]
    return [line(", ".join([*labels, f"context {context}"]), total(**update, context=context))]


def _compact_kv(model: Model) -> list[str]:
    """KV cache types smaller than the model's, least lossy first, that its backend takes."""
    if model.backend == "vllm":
        return [] if model.kv_cache_dtype == "fp8" else ["fp8"]
    order = ["q8_0", "q4_0"]
    if model.kv_cache_dtype in order:
        return order[order.index(model.kv_cache_dtype) + 1 :]
    return order


def _longest_context(model: Model, free_gib: float, update: dict[str, object]) -> int | None:
    """The longest context, a multiple of 1024 below the model's (or 128 if even 1024 is too long), that fits."""

    def fits(context: int) -> bool:
        return estimate(model.model_copy(update={**update, "context": context})).total_gib <= free_gib

    top = (model.context - 1) // 1024
    if top >= 1 and fits(1024):
        low, high = 1, top  # fits(low * 1024) holds; find the largest
        while low < high:
            mid = (low + high + 1) // 2
            if fits(mid * 1024):
                low = mid
            else:
                high = mid - 1
        return low * 1024
    if model.context > 128 and fits(128):
        return 128
    return None
