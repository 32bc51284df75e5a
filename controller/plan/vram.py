"""VRAM estimate of one replica: weights + KV cache + runtime overhead.

KV cache = 2 (K and V) × layers × KV heads × head dim × context × parallel
slots × bytes per element, sized so that every slot can hold a full context
at once: the backends are configured (see ``controller.backends``) to
allocate exactly that, so the estimate is what the GPU will hold.

With tensor parallelism the weights and the KV heads are split across the
replica's GPUs; the runtime overhead is paid on each GPU.
"""

from __future__ import annotations

from controller.plan.models import Estimate
from controller.spec.models import Model

GIB = 1024**3

# Bits per weight of each quantization, including block scales (llama.cpp's
# published sizes for GGUF types; AWQ/GPTQ 4-bit plus group scales).
BITS_PER_WEIGHT = {
    "q4_0": 4.5,
    "q4_k_m": 4.85,
    "q5_k_m": 5.69,
    "q6_k": 6.56,
    "q8_0": 8.5,
    "f16": 16.0,
    "awq": 4.25,
    "gptq": 4.25,
    "fp8": 8.0,
}
DTYPE_BITS = {"auto": 16.0, "float16": 16.0, "bfloat16": 16.0, "float32": 32.0}
# Ollama's default tags are Q4_K_M; "none" means the tag's own quantization.
OLLAMA_DEFAULT_QUANT = "q4_k_m"
KV_BYTES = {"float16": 2.0, "bfloat16": 2.0, "fp8": 1.0, "q8_0": 1.0625, "q4_0": 0.5625}

# Per-GPU runtime overhead beyond weights and KV cache, in GiB:
# vLLM: CUDA context (~0.5), activation peak from its profiling run and CUDA
#   graphs (~1.0–1.5 for 7–14B models at default batch sizes);
# llama.cpp: CUDA context plus compute buffers for the batch (~0.3–0.6);
# Ollama: its llama.cpp runner plus the server process (~0.6–0.9).
OVERHEAD_GIB = {"vllm": 2.0, "llamacpp": 0.6, "ollama": 0.9}


def estimate(model: Model) -> Estimate:
    """The memory one replica of ``model`` needs on each of its GPUs."""
    arch = model.arch
    assert arch.layers and arch.kv_heads and arch.head_dim and arch.params_b, "arch resolved by the spec loader"
    tp = model.gpus_per_replica
    weights_total, weights_basis = _weights_gib(model)
    kv_bytes, kv_name = _kv_bytes(model)
    kv_total = 2 * arch.layers * arch.kv_heads * arch.head_dim * model.context * model.parallel * kv_bytes / GIB
    overhead = OVERHEAD_GIB[model.backend]
    weights = weights_total / tp
    kv = kv_total / tp
    split = f", split over {tp} GPUs" if tp > 1 else ""
    basis = {
        "weights": weights_basis + split,
        "kv_cache": (
            f"2 × {arch.layers} layers × {arch.kv_heads} kv heads × {arch.head_dim} head dim × "
            f"{model.context} ctx × {model.parallel} slots × {kv_bytes:g} B ({kv_name}){split}"
        ),
        "overhead": f"{model.backend} runtime per GPU",
    }
    return Estimate(
        weights_gib=round(weights, 3),
        kv_cache_gib=round(kv, 3),
        overhead_gib=round(overhead, 3),
        total_gib=round(weights + kv + overhead, 3),
        basis=basis,
    )


def _weights_gib(model: Model) -> tuple[float, str]:
    arch = model.arch
    if arch.weights_gib is not None:
        return arch.weights_gib, f"{arch.weights_gib:.2f} GiB of weights (file size or spec)"
    assert arch.params_b is not None
    quant = model.quantization
    if quant == "none":
        if model.backend == "vllm":
            bits, label = DTYPE_BITS[model.dtype], f"{model.dtype} (16-bit)" if model.dtype == "auto" else model.dtype
        elif model.backend == "ollama":
            bits, label = BITS_PER_WEIGHT[OLLAMA_DEFAULT_QUANT], f"{OLLAMA_DEFAULT_QUANT} (Ollama default tag)"
        else:
            bits, label = 16.0, "f16"
    else:
        bits, label = BITS_PER_WEIGHT[quant], quant
    size = arch.params_b * 1e9 * bits / 8 / GIB
    return size, f"{arch.params_b:g}B params × {bits:g} bits ({label})"


def _kv_bytes(model: Model) -> tuple[float, str]:
    kv = model.kv_cache_dtype
    if kv == "auto":
        if model.backend == "vllm" and model.dtype == "float32":
            return 4.0, "float32"
        return 2.0, "16-bit"
    return KV_BYTES[kv], kv
