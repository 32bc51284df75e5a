"""The VRAM estimate against published memory figures of real models, never under, not absurdly over.

Each figure is written here with where it was published. The estimate must be at least the real allocation
(less only the rounding of the log's own printout) and at most 1.35 times it, except where a term is a stated
upper bound (vLLM's CUDA graphs, the sleep residue), which is checked from below only. The numbers are not the
formula's: they are what llama.cpp, Ollama and vLLM logged for those models.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from controller.errors import SpecError
from controller.local.demo_model import write_demo_model
from controller.plan.models import Estimate
from controller.plan.vram import estimate, fit_hints, gib_pair
from controller.spec import load_spec
from controller.spec.models import Arch, Model, Source, Speculative
from tests.helpers import MINIMAL, write_spec

GIB = 1024**3
MIB = 1024**2
MOST = 1.35  # never more than this many times the published allocation


def near_above(estimated: float, published: float, printed_step: float = 0.0) -> None:
    """``estimated`` is at least ``published`` (less half the step the log printed it to) and at most MOST × it."""
    assert estimated >= published - printed_step / 2, f"under-counts: {estimated} < {published}"
    assert estimated <= MOST * published, f"absurdly over: {estimated} > {MOST} × {published}"


def llamacpp(arch: Arch, **kw: Any) -> Model:
    fields: dict[str, Any] = {"name": "m", "backend": "llamacpp", "source": Source(gguf="/m/m.gguf"), "arch": arch}
    return Model(**{**fields, "context": 2048, **kw})


# Published architectures (the models' config.json / GGUF metadata as the logs below print them).
MISTRAL_7B = Arch(layers=32, kv_heads=8, head_dim=128, heads=32, hidden_size=4096, vocab_size=32000, params_b=7.24)
LLAMA_3_8B = Arch(layers=32, kv_heads=8, head_dim=128, heads=32, hidden_size=4096, vocab_size=128256, params_b=8.03)
# TriLM 3.9B: n_embd 3072, 24 heads (no GQA), 30 layers, vocab 50688.
TRILM_3_9B = Arch(layers=30, kv_heads=24, head_dim=128, heads=24, hidden_size=3072, vocab_size=50688, params_b=3.99)


# -- llama.cpp --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "kv_mib", "compute_mib"),
    [
        # fedora-copr/logdetective#106 (mistral-7b-instruct-v0.2.Q4_K_S.gguf, per #111), flash_attn = 0, n_ubatch 512:
        # "n_ctx = 2048 … CUDA0 KV buffer size = 256.00 MiB … CUDA0 compute buffer size = 164.00 MiB"
        (2048, 256.00, 164.00),
        # same PR: "n_ctx = 32768 … CUDA0 KV buffer size = 4096.00 MiB … CUDA0 compute buffer size = 2144.00 MiB"
        (32768, 4096.00, 2144.00),
    ],
)
def test_llamacpp_mistral_7b_kv_and_compute_grow_with_context(context: int, kv_mib: float, compute_mib: float) -> None:
    est = estimate(llamacpp(MISTRAL_7B, context=context, quantization="q4_k_m"))
    near_above(est.kv_cache_gib * 1024, kv_mib, 0.01)
    near_above(est.compute_gib * 1024, compute_mib, 0.01)


def test_llamacpp_trilm_compute_buffer_is_the_logits_at_short_context() -> None:
    # mozilla-ai/llamafile#552 (TriLM 3.9B, RTX 4080), n_ctx 512, flash_attn = 0:
    # "CUDA0 KV buffer size = 180.00 MiB … CUDA0 compute buffer size = 105.00 MiB"
    est = estimate(llamacpp(TRILM_3_9B, context=512))
    near_above(est.kv_cache_gib * 1024, 180.00, 0.01)
    near_above(est.compute_gib * 1024, 105.00, 0.01)


def test_kv_cache_per_token_of_llama_3_8b() -> None:
    # 128 KiB per token at f16: 32 layers × 8 KV heads × 128 × 2 (K, V) × 2 bytes; llama.cpp prints
    # "CUDA0 KV buffer size = 1024.00 MiB" for n_ctx 8192 (Ollama's llama3.1:8b runner log below).
    one = estimate(llamacpp(LLAMA_3_8B, context=8192))
    assert one.kv_cache_gib * GIB / 8192 == pytest.approx(128 * 1024, rel=1e-3)
    vllm = Model(
        name="v", backend="vllm", source=Source(huggingface="meta-llama/Meta-Llama-3-8B"), arch=LLAMA_3_8B, context=8192
    )
    assert estimate(vllm).kv_cache_gib == one.kv_cache_gib == 1.0


# Ollama 0.5-era server log of `llama3.1:8b` (Q4_K_M, blob sha256-667b0c1932bc…, 4 slots × 2048 tokens), quoted
# publicly (found by text search, no stable URL). llama.cpp's own lines:
#   "model size = 4.58 GiB (4.89 BPW)"  "CPU model buffer size = 281.81 MiB"  "CUDA0 model buffer size = 4403.49 MiB"
#   "n_ctx = 8192 … flash_attn = 0"  "CUDA0 KV buffer size = 1024.00 MiB"  "CUDA0 compute buffer size = 560.00 MiB"
# and Ollama's own estimate before loading it:
#   memory.required.full="6.5 GiB" memory.required.kv="1.0 GiB" memory.weights.total="4.9 GiB" memory.graph.full="560.0 MiB"
LLAMA31_8B_Q4KM_GPU_MIB = 4403.49 + 1024.00 + 560.00


def test_llamacpp_llama_3_1_8b_q4_k_m_against_its_buffers() -> None:
    est = estimate(llamacpp(LLAMA_3_8B, context=2048, parallel=4, quantization="q4_k_m"))
    near_above(est.weights_gib * 1024, 4403.49, 0.01)  # no local file: the whole file's bits per weight
    near_above(est.compute_gib * 1024, 560.00, 0.01)
    near_above(est.kv_cache_gib * 1024, 1024.00, 0.01)
    # the buffers llama.cpp allocates, plus its CUDA runtime that the log does not print
    near_above(est.total_gib * 1024, LLAMA31_8B_Q4KM_GPU_MIB)


def test_ollama_llama_3_1_8b_books_at_least_what_ollama_itself_requires() -> None:
    model = llamacpp(LLAMA_3_8B, context=2048, parallel=4, quantization="q4_k_m")
    est = estimate(model.model_copy(update={"backend": "ollama", "source": Source(ollama="llama3.1:8b")}))
    near_above(est.total_gib, 6.5, 0.1)  # Ollama's "memory.required.full=6.5 GiB"; less and it offloads to CPU
    near_above(est.total_gib * 1024, LLAMA31_8B_Q4KM_GPU_MIB)


def test_flash_attention_compute_buffer_of_gpt_oss_at_long_context() -> None:
    # A public llama.cpp log of gpt-oss-20b (24 layers, width 2880, 64 heads, 8 KV heads of 64, vocab 201088),
    # found by text search (no stable URL): "n_ctx = 131072 … flash_attn = enabled … CUDA0 compute buffer size =
    # 456.98 MiB". (Its KV cache is smaller than the estimate's: half its layers use a sliding window.)
    gpt_oss = Arch(layers=24, kv_heads=8, head_dim=64, heads=64, hidden_size=2880, vocab_size=201088, params_b=20.9)
    est = estimate(llamacpp(gpt_oss, context=131072, flash_attention=True))
    near_above(est.compute_gib * 1024, 456.98, 0.01)
    without = estimate(llamacpp(gpt_oss, context=131072))
    assert without.compute_gib > 30 * est.compute_gib  # 64 heads of scores over 131072 cells: 32 GiB


@pytest.mark.parametrize(
    ("quant", "params_b", "published_gib"),
    [
        ("q4_0", 70.55, 37.22),  # Llama-3.1-70B Q4_0: "model size = 37.22 GiB (4.53 BPW)", ollama/ollama#6279
        ("q8_0", 8.03, 7.95),  # Llama-3-8B-Instruct Q8_0: "model size = 7.95 GiB (8.50 BPW)", argilla-io/distilabel#593
        ("q4_k_m", 8.03, 4.58),  # Llama-3.1-8B Q4_K_M: "4.58 GiB (4.89 BPW)", the 4.92 GB file on Hugging Face
    ],
)
def test_gguf_weights_without_a_local_file(quant: str, params_b: float, published_gib: float) -> None:
    arch = Arch(layers=32, kv_heads=8, head_dim=128, params_b=params_b)
    near_above(estimate(llamacpp(arch, quantization=quant)).weights_gib, published_gib, 0.01)


# -- vLLM -------------------------------------------------------------------------------


def vllm(arch: Arch, **kw: Any) -> Model:
    return Model(name="v", backend="vllm", source=Source(huggingface="org/m"), arch=arch, **{"context": 8192, **kw})


def test_vllm_llama_3_8b_against_its_memory_profile() -> None:
    # vllm-project/vllm#10511 (youkaichao, `vllm serve meta-llama/Meta-Llama-3-8B`, H100 80 GB, 8192 batched tokens):
    # "model weights take 14.96GiB … non_torch_memory 1.79GiB … PyTorch activation peak memory 1.26GiB"
    # (non_torch then counted from before the instance started: the CUDA context included).
    est = estimate(vllm(LLAMA_3_8B, parallel=256))  # the server's default 256 sequences
    near_above(est.weights_gib, 14.96, 0.01)
    near_above(est.compute_gib, 1.26, 0.01)
    non_kv = est.total_gib - est.kv_cache_gib
    near_above(non_kv, 14.96 + 1.79 + 1.26)  # its CUDA graphs come on top of those, unprinted there
    # Outside the utilization fraction: the CUDA context (taken before vLLM's baseline) and the graphs.
    assert est.outside_utilization_gib == pytest.approx(0.5 + est.graphs_gib)


def test_vllm_graphs_and_sleep_residue_are_upper_bounds() -> None:
    # vllm-project/vllm#11349: `vllm serve meta-llama/Llama-3.2-1B-Instruct` "Graph capturing finished in 14 secs,
    # took 0.21 GiB"
    llama_1b = Arch(layers=16, kv_heads=8, head_dim=64, heads=32, hidden_size=2048, vocab_size=128256, params_b=1.24)
    est = estimate(vllm(llama_1b, parallel=256))
    assert est.graphs_gib >= 0.21
    # vllm-project/vllm#17117: "Sleep mode freed 23.74 GiB memory, 4.75 GiB memory is still in use."
    assert est.sleep_residue_gib is not None and 4.75 <= est.sleep_residue_gib <= est.total_gib
    assert estimate(llamacpp(llama_1b)).sleep_residue_gib is None


def test_quantized_vllm_checkpoints_keep_16_bit_embeddings() -> None:
    # Llama-3.1-8B: 128256 × 4096 embeddings and as many output weights, 1.05B of its 8.03B, stay 16-bit in FP8,
    # AWQ and GPTQ checkpoints.
    embed = 128256 * 4096 * 2
    fp8 = estimate(vllm(LLAMA_3_8B, quantization="fp8"))
    assert fp8.weights_gib == pytest.approx(((8.03e9 - embed) * 1 + embed * 2) / GIB, abs=2e-3)
    awq = estimate(vllm(LLAMA_3_8B, quantization="awq"))
    assert awq.weights_gib == pytest.approx(((8.03e9 - embed) * 4.25 / 8 + embed * 2) / GIB, abs=2e-3)
    # Without the vocabulary and width, a share of the parameters by model size, at least the real one.
    bare = estimate(vllm(Arch(layers=32, kv_heads=8, head_dim=128, params_b=8.03), quantization="fp8"))
    assert bare.weights_gib >= fp8.weights_gib and "give arch.vocab_size" in bare.basis["weights"]


def test_vllm_tensor_parallel_splits_weights_and_kv_heads() -> None:
    one = estimate(vllm(LLAMA_3_8B))
    two = estimate(vllm(LLAMA_3_8B, gpus_per_replica=2))
    assert two.weights_gib == pytest.approx(one.weights_gib / 2, abs=2e-3)
    assert two.kv_cache_gib == pytest.approx(one.kv_cache_gib / 2, abs=2e-3)
    assert two.compute_gib == one.compute_gib  # activations are not split (1.26 GiB at TP 1 and 2 alike)
    assert (one.overhead_gib, two.overhead_gib) == (0.9, 1.25)  # NCCL and the custom all-reduce with TP
    # More GPUs than KV heads: vLLM replicates them, so the KV cache stops shrinking.
    few = Arch(layers=32, kv_heads=2, head_dim=128, params_b=8.03)
    assert estimate(vllm(few, gpus_per_replica=4)).kv_cache_gib == estimate(vllm(few, gpus_per_replica=2)).kv_cache_gib


def test_total_is_the_sum_of_the_terms() -> None:
    for model in (vllm(LLAMA_3_8B), llamacpp(LLAMA_3_8B, parallel=3)):
        est = estimate(model)
        assert est.total_gib == pytest.approx(sum(est.terms().values()), abs=1e-9)
        assert set(est.basis) >= {"weights", "kv_cache", "compute", "overhead"}


# -- speculative decoding --------------------------------------------------------------------


def test_llamacpp_draft_counts_weights_and_a_kv_cache_per_slot() -> None:
    draft = Arch(layers=16, kv_heads=8, head_dim=64, heads=32, hidden_size=2048, vocab_size=128256, params_b=1.24)
    spec = Speculative(method="draft", draft=Source(gguf="/m/d.gguf"), draft_arch=draft)
    plain = estimate(llamacpp(LLAMA_3_8B, context=4096, parallel=2, quantization="q4_k_m"))
    est = estimate(llamacpp(LLAMA_3_8B, context=4096, parallel=2, quantization="q4_k_m", speculative=spec))
    draft_kv = 2 * 16 * 8 * 64 * 4096 * 2 / GIB  # f16, each slot's own context
    assert est.draft_gib > 1.24e9 * 5.01 / 8 / GIB + 2 * draft_kv
    assert est.total_gib == pytest.approx(plain.total_gib + est.draft_gib, abs=2e-3)
    assert "2 slots" in est.basis["draft"]


def test_vllm_mtp_counts_one_more_layer() -> None:
    est = estimate(vllm(LLAMA_3_8B, speculative=Speculative(method="mtp", tokens=2)))
    base = estimate(vllm(LLAMA_3_8B))
    assert est.draft_gib == pytest.approx(base.weights_gib / 32 + base.kv_cache_gib / 32, abs=2e-3)
    assert estimate(vllm(LLAMA_3_8B, speculative=Speculative(method="ngram"))).draft_gib == 0


# -- long context: planned with its numbers, or what would make it fit -------------------------------------


QWEN3_4B = Arch(
    layers=36,
    kv_heads=8,
    head_dim=128,
    heads=32,
    hidden_size=2560,
    vocab_size=151936,
    params_b=4.02,
    max_context=262144,
)


def _hint_total(line: str) -> float:
    match = re.fullmatch(r"(.+): (\d+\.\d\d) GiB( per GPU)?", line)
    assert match, line
    return float(match.group(2))


def test_a_256k_context_on_a_16_gb_card_is_refused_with_what_would_fit() -> None:
    model = llamacpp(QWEN3_4B, context=262144, quantization="q4_k_m")
    est = estimate(model)
    assert est.total_gib > 15.5  # 36 GiB of f16 KV cache and 16 GiB of attention scores
    assert "262144 cells" in est.basis["kv_cache"] and "no flash attention" in est.basis["compute"]
    hints = fit_hints(model, 15.5)
    assert hints and all(_hint_total(h) <= 15.5 for h in hints)
    assert any(h.startswith("kv_cache_dtype q4_0:") for h in hints)  # q8_0 still needs 19 GiB
    context = next(h for h in hints if h.startswith("context "))
    size = int(context.split()[1].rstrip(":"))
    assert size < 262144 and size % 1024 == 0
    assert estimate(model.model_copy(update={"context": size})).total_gib <= 15.5
    assert estimate(model.model_copy(update={"context": size + 1024})).total_gib > 15.5


def test_fit_hints_offer_only_what_the_backend_takes() -> None:
    big = vllm(LLAMA_3_8B, context=65536, parallel=4)  # 50 GiB, 32 of them KV cache
    hints = fit_hints(big, 35.0)
    assert hints and not any("q8_0" in h or "q4_0" in h or "flash" in h for h in hints)
    assert all(_hint_total(h) <= 35.0 for h in hints)
    assert {h.split(":")[0].split()[0] for h in hints} == {"parallel", "kv_cache_dtype", "context", "gpus_per_replica"}
    # Nothing single fits: the combined change, or nothing if even that cannot.
    assert fit_hints(llamacpp(LLAMA_3_8B, context=262144, parallel=8), 0.5) == []
    combined = fit_hints(llamacpp(QWEN3_4B, context=262144, parallel=64, quantization="q4_k_m"), 3.3)
    assert len(combined) == 1 and combined[0].startswith("parallel 1, kv_cache_dtype q4_0, flash_attention true, ")
    assert _hint_total(combined[0]) <= 3.3


def test_gib_pair_shows_a_difference_of_one_mib() -> None:
    assert gib_pair(7.04, 7.04 - 1 / 1024) == ("7.040", "7.039")
    assert gib_pair(7.04, 7.04) == ("7.04", "7.04")
    assert gib_pair(12.5, 3.25) == ("12.50", "3.25")
    a, b = gib_pair(1.0, 1.0 + 1e-12)
    assert a != b


# -- the model's own maximum context, and a draft's tokenizer ----------------------------------------


def test_context_beyond_the_models_maximum_is_refused_unless_rope_scaling(tmp_path: Path) -> None:
    config = {
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    data = copy.deepcopy(MINIMAL)
    data["models"][0].update(arch_from="config.json", context=65536, parallel=1)
    data["models"][0].pop("arch")
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path / "f.yaml", data))
    (line,) = info.value.lines()
    assert "models[0].context: model m8b: context 65536 is beyond the model's own maximum of 32768 tokens" in line
    assert "rope_scaling: 2" in line
    data["models"][0]["rope_scaling"] = 2
    spec = load_spec(write_spec(tmp_path / "f.yaml", data))
    assert spec.fleet.models[0].arch.max_context == 32768


def test_config_json_rope_scaling_extends_the_maximum(tmp_path: Path) -> None:
    from controller.spec.arch import read_arch

    config = {"max_position_embeddings": 32768, "rope_scaling": {"type": "yarn", "factor": 4.0}, "vocab_size": 10}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_arch(tmp_path / "config.json")["max_context"] == 131072


def _speculative_spec(tmp_path: Path, draft_seed: int) -> Path:
    write_demo_model(tmp_path / "target.gguf")
    write_demo_model(tmp_path / "draft.gguf", seed=draft_seed)
    data = copy.deepcopy(MINIMAL)
    data["models"] = [
        {
            "name": "t",
            "backend": "llamacpp",
            "source": {"gguf": "target.gguf"},
            "context": 1024,
            "speculative": {"method": "draft", "draft": {"gguf": "draft.gguf"}},
        }
    ]
    return write_spec(tmp_path / "f.yaml", data)


def test_draft_arch_is_read_from_its_gguf_and_counted(tmp_path: Path) -> None:
    spec = load_spec(_speculative_spec(tmp_path, draft_seed=0))
    model = spec.fleet.models[0]
    assert model.speculative is not None and model.speculative.draft_arch.layers == 2
    est: Estimate = estimate(model)
    assert est.draft_gib > 0 and "draft" in est.basis


def test_draft_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(_speculative_spec(tmp_path, draft_seed=1))  # other made-up words from token 260 on
    (line,) = info.value.lines()
    assert "models[0].speculative.draft: model t: the draft" in line and "draft.gguf" in line
    assert "target.gguf" in line and "token 260 is" in line


def test_draft_vocabulary_size_must_match_for_vllm(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["arch"]["vocab_size"] = 152064
    data["models"][0]["speculative"] = {
        "method": "draft",
        "draft": {"huggingface": "org/small"},
        "draft_arch": {"layers": 24, "kv_heads": 2, "head_dim": 64, "params_b": 0.49, "vocab_size": 151936},
    }
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path / "f.yaml", data))
    lines = [line for line in info.value.lines() if "differs from" in line]
    assert len(lines) == 1 and "151936 tokens" in lines[0] and "(152064" in lines[0]
