"""VRAM estimate and placement: numbers checked by hand, decisions deterministic."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest

from controller.errors import PlanError
from controller.plan import make_plan, placement, slug
from controller.plan.vram import estimate
from controller.spec import load_spec
from tests.helpers import MINIMAL, write_spec

GIB = 1024**3


def plan_of(tmp_path: Path, data: dict[str, Any]):  # type: ignore[no-untyped-def]
    return make_plan(load_spec(write_spec(tmp_path / "f.yaml", data)))


def test_estimate_terms_by_hand(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path / "f.yaml", MINIMAL))
    est = estimate(spec.fleet.models[0])
    weights = 8.0e9 * 2 / GIB  # 16-bit weights
    kv = 2 * 32 * 8 * 128 * 8192 * 4 * 2 / GIB  # K and V × layers × kv heads × head dim × ctx × slots × 2 bytes
    # vLLM's activation peak, 1.26 GiB for an 8.03B 32-layer model, × √(params per layer ratio)
    compute = 1.26 * (8.0 / 8.03) ** 0.5
    assert est.weights_gib == pytest.approx(weights, abs=1e-3)
    assert est.kv_cache_gib == pytest.approx(kv, abs=1e-3) and kv == 4.0
    assert est.compute_gib == pytest.approx(compute, abs=1e-3)
    assert est.graphs_gib == 0.5  # CUDA graphs, up to 15B params per GPU, batches of at most 8 (2 × 4 slots)
    assert est.overhead_gib == 0.9  # CUDA context 0.5 + cuBLAS 0.4
    assert est.total_gib == pytest.approx(weights + kv + compute + 0.5 + 0.9, abs=2e-3)
    assert est.outside_utilization_gib == 1.0  # the CUDA context and graphs lie outside the utilization fraction
    assert "8192 ctx × 4 slots" in est.basis["kv_cache"]


def test_kv_cache_dtype_and_tensor_parallel_split(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0].update(kv_cache_dtype="fp8", gpus_per_replica=2)
    est = estimate(load_spec(write_spec(tmp_path / "f.yaml", data)).fleet.models[0])
    assert est.kv_cache_gib == pytest.approx(1.0)  # 4 GiB at 2 bytes → 2 at 1 byte → split over 2 GPUs
    assert est.weights_gib == pytest.approx(8.0e9 * 2 / GIB / 2, abs=1e-3)
    assert est.overhead_gib == 1.25 and est.graphs_gib == 0.5  # paid on each GPU (with NCCL: 0.75 beside the context)


def test_vllm_settings_make_the_estimate_true(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, MINIMAL)
    (worker,) = plan.workers
    util = worker.settings["gpu_memory_utilization"]
    outside = worker.estimate.outside_utilization_gib  # CUDA context and graphs: vLLM takes them beyond the fraction
    assert outside > 0
    assert util * 24 + outside >= worker.estimate.total_gib  # vLLM may take at least the estimate
    assert util * 24 + outside - worker.estimate.total_gib < 0.24 + 1e-9  # and at most one hundredth more
    assert worker.footprint_gib == round(util * 24 + outside, 3)  # and the GPU books all of it
    assert worker.settings["max_model_len"] == 8192 and worker.settings["max_num_seqs"] == 4


def test_llamacpp_context_is_per_slot_times_slots(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"] = [
        {
            "name": "g",
            "backend": "llamacpp",
            "source": {"gguf": "/m/g.gguf"},
            "context": 4096,
            "parallel": 3,
            "arch": {"layers": 2, "kv_heads": 2, "head_dim": 64, "params_b": 0.1},
        }
    ]
    (worker,) = plan_of(tmp_path, data).workers
    assert worker.settings == {
        "ctx_size": 12288,
        "parallel": 3,
        "n_gpu_layers": 999,
        "cache_type": "f16",
        "http_threads": 16,
    }


def test_replicas_spread_over_gpus_and_names_are_deterministic(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["replicas"] = 2
    plan = plan_of(tmp_path, data)
    assert [w.name for w in plan.workers] == ["m8b-ws-gpu0", "m8b-ws-gpu1"]
    assert sorted(w.gpus[0].index for w in plan.workers) == [0, 1]
    assert [w.port for w in plan.workers] == [8100, 8101]
    assert plan == plan_of(tmp_path, data)  # same spec, same plan


def test_small_models_share_a_gpu_best_fit(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    big = copy.deepcopy(data["models"][0])
    big["context"] = 4096  # 20.4 GiB: room beside it for the small one (2 GiB)
    small = {
        "name": "small",
        "backend": "llamacpp",
        "source": {"gguf": "/m/s.gguf"},
        "context": 2048,
        "arch": {"layers": 2, "kv_heads": 2, "head_dim": 64, "params_b": 0.5},
    }
    data["models"] = [big, small]
    plan = plan_of(tmp_path, data)
    by_model = {w.model: w for w in plan.workers}
    # best fit: the small model goes beside the big one, leaving GPU 1 wholly free
    assert by_model["small"].gpus[0].index == by_model["m8b"].gpus[0].index


def test_pin_to_gpu_by_uuid(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["placement"] = [{"host": "ws", "gpus": ["GPU-00000000-0000-4000-8000-000000000002"]}]
    (worker,) = plan_of(tmp_path, data).workers
    assert worker.gpus[0].uuid == "GPU-00000000-0000-4000-8000-000000000002"
    assert worker.gpus[0].cdi == "nvidia.com/gpu=GPU-00000000-0000-4000-8000-000000000002"


def test_tensor_parallel_spans_gpus_of_one_host(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0].update(gpus_per_replica=2, context=16384)
    data["models"][0]["arch"]["params_b"] = 16  # 29.8 GiB of weights: two GPUs or none
    (worker,) = plan_of(tmp_path, data).workers
    assert [g.index for g in worker.gpus] == [0, 1]
    assert worker.name == "m8b-ws-gpu0-1"
    assert worker.settings["tensor_parallel_size"] == 2


def test_does_not_fit_names_gpus_needed_and_free(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["context"] = 131072  # 64 GiB of KV cache
    with pytest.raises(PlanError) as info:
        plan_of(tmp_path, data)
    (line,) = info.value.lines()
    assert "models[0]: model m8b replica 1: needs 81.56 GiB per GPU (81.64 as booked by vllm)" in line
    assert "(weights 14.90 + kv cache 64.00 + compute 1.26 + graphs 0.50 + overhead 0.90)" in line
    assert "ws/gpu0 (Test GPU, GPU-00000000-0000-4000-8000-000000000001) has 23.50 GiB free of 23.50 usable" in line
    assert "(59535 MiB short of 81.64)" in line and "ws/gpu1" in line
    # What would make it fit, with the total it would then need (a long context on a 24 GiB card).
    assert "it would fit with context 11264: 23.06 GiB" in line


def test_never_spills_across_gpus(tmp_path: Path) -> None:
    """Two 24 GiB GPUs hold 47 GiB together, but a 30 GiB replica without TP must fail."""
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["arch"]["params_b"] = 13  # 24.2 GiB of weights alone
    with pytest.raises(PlanError):
        plan_of(tmp_path, data)


def test_second_replica_that_does_not_fit(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["replicas"] = 3  # ~15 GiB each: two GPUs hold two, not three
    with pytest.raises(PlanError) as info:
        plan_of(tmp_path, data)
    (line,) = info.value.lines()
    assert "replica 3" in line


def test_port_collision_on_gateway_host(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["gateway"]["ports"] = {"https": 8443, "http": 8080, "envoy": 9090}
    with pytest.raises(PlanError) as info:
        plan_of(tmp_path, data)
    (line,) = info.value.lines()
    assert (
        "gateway.ports.gatekeeper: host ws: port 9090 for gateway gatekeeper is already taken by gateway envoy" in line
    )


def test_worker_ports_skip_fixed_ports(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["replicas"] = 2
    data["hosts"][0]["agent_port"] = 8100
    assert [w.port for w in plan_of(tmp_path, data).workers] == [8101, 8102]


def test_cpu_replicas_use_cpu_worker_slots(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["hosts"][0]["cpu_workers"] = 2
    data["models"] = [
        {
            "name": "tiny",
            "backend": "llamacpp",
            "device": "cpu",
            "source": {"gguf": "/m/t.gguf"},
            "context": 512,
            "replicas": 2,
            "arch": {"layers": 2, "kv_heads": 2, "head_dim": 16, "params_b": 0.001},
        }
    ]
    plan = plan_of(tmp_path, data)
    assert [w.name for w in plan.workers] == ["tiny-ws-cpu-1", "tiny-ws-cpu-2"]
    assert all(not w.gpus and w.settings["n_gpu_layers"] == 0 for w in plan.workers)
    data["models"][0]["replicas"] = 3
    with pytest.raises(PlanError) as info:
        plan_of(tmp_path, data)
    (line,) = info.value.lines()
    assert "model tiny: no CPU worker slot left (ws: 0 of 2 cpu_workers free)" in line


def test_slug() -> None:
    assert slug("Qwen/Qwen2.5-7B-Instruct") == "qwen-qwen2-5-7b-instruct"
    assert slug("llama3.1:8b") == "llama3-1-8b"


def test_monitoring_ports_collide_like_any_other(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["gateway"]["ports"] = {"https": 8443, "http": 8080, "prometheus": 9090}
    with pytest.raises(PlanError) as info:
        plan_of(tmp_path, data)
    (line,) = info.value.lines()
    assert (
        "gateway.ports.prometheus: host ws: port 9090 for gateway prometheus is already taken by gateway gatekeeper"
        in line
    )


def random_fleet(seed: int) -> dict[str, Any]:
    """A fleet of mixed GPU sizes, vLLM and llama.cpp models of mixed sizes, some tensor-parallel, some pinned,
    some with more replicas than hosts (so hosts and GPUs hold two of one model), and a swap group."""
    rng = random.Random(seed)
    hosts = []
    for h in range(rng.randint(2, 7)):
        sizes = [rng.choice([12, 16, 24, 24, 48]) for _ in range(rng.randint(1, 4))]
        gpus = [
            {"uuid": f"GPU-{h:08x}-{g:04x}-4000-8000-{seed:012x}", "name": "Test GPU", "vram_gib": v}
            for g, v in enumerate(sizes)
        ]
        hosts.append(
            {
                "name": f"h{h}",
                "address": f"10.80.0.{h + 1}",
                "ssh": f"ops@h{h}.example.org",
                "endpoint": f"h{h}.example.org:51820",
                "gpus": gpus,
            }
        )
    models: list[dict[str, Any]] = []
    for m in range(rng.randint(3, 10)):
        params = rng.choice([0.5, 1.5, 3.0, 7.0, 8.0])
        model: dict[str, Any] = {
            "name": f"m{m}",
            "backend": rng.choice(["vllm", "llamacpp"]),
            "arch": {"layers": 24, "kv_heads": 4, "head_dim": 64, "params_b": params},
            "context": rng.choice([2048, 4096, 8192]),
            "parallel": rng.choice([1, 2, 4]),
            "replicas": rng.randint(1, 4),
        }
        model["source"] = {"huggingface": f"org/m{m}"} if model["backend"] == "vllm" else {"gguf": f"m{m}.gguf"}
        roll = rng.random()
        if roll < 0.15 and model["backend"] == "vllm":
            model["gpus_per_replica"] = 2
        elif roll < 0.3:
            host = rng.choice(hosts)
            model["placement"] = [{"host": host["name"]}]
        models.append(model)
    first = hosts[0]
    swap = []
    if len(first["gpus"]) > 1 and seed % 3 == 0:  # h0's first GPU is a swap group's: no replica above may take it
        swap = [{"name": "g", "host": first["name"], "gpus": [0]}]
        models.append(
            {
                "name": "od",
                "backend": "llamacpp",
                "source": {"gguf": "od.gguf"},
                "arch": {"layers": 24, "kv_heads": 4, "head_dim": 64, "params_b": 0.5},
                "context": 2048,
                "swap": {"group": "g"},
            }
        )
    return {
        **copy.deepcopy(MINIMAL),
        "mesh": {"kind": "wireguard", "subnet": "10.80.0.0/16", "listen_port": 51820},
        "hosts": hosts,
        "secrets": {"hf_token_file": "/etc/fleet/secrets/hf_token"},
        "models": models,
        "swap_groups": swap,
        "gateway": {**MINIMAL["gateway"], "host": first["name"]},
    }


@pytest.mark.parametrize("seed", range(60))
def test_the_placement_index_picks_what_ranking_every_gpu_picks(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index of GPUs by free memory (placement._ByFree, issue 17) answers single-GPU replicas without a scan;
    with it answering nothing, `_best` ranks every candidate as before. Both give the same plan, or the same
    refusal, on random fleets."""
    data = random_fleet(seed)

    def outcome() -> list[tuple[str, str, tuple[str, ...]]] | str:
        try:
            plan = plan_of(tmp_path, data)
        except PlanError as exc:
            return "\n".join([str(exc), *exc.lines()])
        return sorted((w.name, w.host, tuple(g.uuid for g in w.gpus)) for w in plan.workers)

    indexed = outcome()
    monkeypatch.setattr(placement._ByFree, "best", lambda *_: None)
    assert outcome() == indexed
