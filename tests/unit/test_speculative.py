"""Speculative decoding: the spec's checks (controller/spec/speculative.py) and each backend's own flags for it.

llama.cpp: a container gets the pinned image's (b6800) flags; `controller up` asks the installed llama-server's
`--help` which spelling it takes (controller/backends/llamacpp.py, `dialect_of`), faked here. vLLM: one
`--speculative-config` JSON object. The contract tier runs them (tests/contract/test_speculative.py).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.backends import llamacpp
from controller.backends.llamacpp import LlamaCpp
from controller.backends.vllm import VLLM
from controller.errors import ControllerError, RenderError, SpecError
from controller.local import processes
from controller.local.demo_model import write_demo_model
from controller.local.state import StateDir
from controller.plan import Plan, make_plan
from controller.render import render_all
from controller.spec import load_spec
from controller.spec.models import Model
from tests.helpers import MINIMAL, write_spec

# What the two kinds of llama-server say in `--help` (only the lines `dialect_of` reads).
NEW_HELP = (
    "--spec-draft-n-max N   number of tokens to draft\n--spec-type none,draft-simple,ngram-simple,ngram-mod\n"
    "--spec-ngram-simple-size-m N   ngram size M for ngram-simple speculative decoding, length of draft m-gram\n"
)
B6800_HELP = "--draft-max, --draft, --draft-n N   number of tokens to draft for speculative decoding (default: 16)\n"
# A draft's architecture numbers, for the VRAM estimate, where they cannot be read from a local file.
DRAFT_ARCH = {"layers": 24, "kv_heads": 2, "head_dim": 64, "params_b": 0.5}


def spec_of(tmp_path: Path, model: dict[str, Any], device: str = "gpu") -> Path:
    data = copy.deepcopy(MINIMAL)
    data["models"] = [model]
    if device == "cpu":
        data["hosts"][0]["cpu_workers"] = 1
    return write_spec(tmp_path / "fleet.yaml", data)


def problems(path: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value.lines()


def vllm_model(**extra: Any) -> dict[str, Any]:
    return {**copy.deepcopy(MINIMAL["models"][0]), **extra}


def llama_model(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    write_demo_model(tmp_path / "main.gguf")
    write_demo_model(tmp_path / "small.gguf")
    return {
        "name": "lc",
        "backend": "llamacpp",
        "source": {"gguf": "main.gguf"},
        "context": 512,
        "kv_cache_dtype": "q8_0",
        **extra,
    }


def plan_of(path: Path) -> Plan:
    return make_plan(load_spec(path))


# -- the checks ---------------------------------------------------------------------------------------------------


def test_draft_is_required_exactly_for_method_draft(tmp_path: Path) -> None:
    path = spec_of(tmp_path, llama_model(tmp_path, speculative={"method": "draft"}))
    (line,) = problems(path)
    assert "models[0].speculative.draft: model lc: method draft needs `draft`" in line
    assert "a local GGUF file" in line
    ngram = {"method": "ngram", "draft": {"gguf": "small.gguf"}}
    (line,) = problems(spec_of(tmp_path, llama_model(tmp_path, speculative=ngram)))
    assert "models[0].speculative.draft: model lc: `draft` applies only to method draft" in line


def test_ollama_has_no_speculative_decoding(tmp_path: Path) -> None:
    model = {
        "name": "ol",
        "backend": "ollama",
        "source": {"ollama": "qwen2.5:0.5b"},
        "context": 2048,
        "arch": {"layers": 24, "kv_heads": 2, "head_dim": 64, "params_b": 0.5},
        "speculative": {"method": "ngram"},
    }
    (line,) = problems(spec_of(tmp_path, model))
    assert "models[0].speculative: model ol: Ollama has no speculative decoding; remove `speculative`" in line


def test_mtp_is_vllms(tmp_path: Path) -> None:
    (line,) = problems(spec_of(tmp_path, llama_model(tmp_path, speculative={"method": "mtp"})))
    assert "models[0].speculative.method: model lc: method mtp" in line and "is vLLM's" in line
    plan = plan_of(spec_of(tmp_path, vllm_model(speculative={"method": "mtp", "tokens": 2})))
    assert plan.workers


def test_a_llamacpp_draft_is_a_local_gguf(tmp_path: Path) -> None:
    hf = {"method": "draft", "draft": {"huggingface": "org/small"}, "draft_arch": DRAFT_ARCH}
    (line,) = problems(spec_of(tmp_path, llama_model(tmp_path, speculative=hf)))
    assert "models[0].speculative.draft: model lc: llamacpp takes as draft a local GGUF file" in line
    assert "not a huggingface source" in line
    url = {"method": "draft", "draft": {"gguf": "https://example.org/small.gguf"}, "draft_arch": DRAFT_ARCH}
    (line,) = problems(spec_of(tmp_path, llama_model(tmp_path, speculative=url)))
    assert "models[0].speculative.draft.gguf: model lc: llama-server takes a draft model from a file only" in line


def test_vllm_0_11_has_no_draft_model(tmp_path: Path) -> None:
    """vLLM 0.11's engine refuses a draft model at start (NotImplementedError): the check says so and what to use."""
    draft = {"method": "draft", "draft": {"huggingface": "org/small"}, "draft_arch": DRAFT_ARCH}
    (line,) = problems(spec_of(tmp_path, vllm_model(speculative=draft)))
    assert "models[0].speculative.method: model m8b: vLLM 0.11 (the pinned image) has no speculative decoding" in line
    assert "use method ngram, method mtp for a model with MTP layers, or serve the model with llamacpp" in line
    gguf = {"method": "draft", "draft": {"gguf": "small.gguf"}}
    lines = problems(spec_of(tmp_path, vllm_model(speculative=gguf)))
    assert any("vllm takes as draft a Hugging Face repo" in line for line in lines), lines


def test_the_plan_owns_the_speculative_flags(tmp_path: Path) -> None:
    options = {"model-draft": "x.gguf", "draft-max": 8, "spec-type": "ngram-simple"}
    lines = problems(spec_of(tmp_path, llama_model(tmp_path, options=options)))
    assert len(lines) == 3 and all("is set by the plan (the spec's speculative)" in line for line in lines), lines
    (line,) = problems(spec_of(tmp_path, vllm_model(options={"speculative-config": "{}"})))
    assert "'speculative-config' is set by the plan (the spec's speculative)" in line


# -- vLLM: --speculative-config --------------------------------------------------------------------------------


def speculative_config(args: list[str]) -> Any:
    return json.loads(args[args.index("--speculative-config") + 1])


def test_vllm_takes_one_json_object(tmp_path: Path) -> None:
    ngram = plan_of(spec_of(tmp_path, vllm_model(speculative={"method": "ngram", "tokens": 6})))
    (w,) = ngram.workers
    args = VLLM().container_args(w, ngram.model(w.model), "/run/secrets/worker_key")
    assert speculative_config(args) == {"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_max": 4}
    assert args.count("--speculative-config") == 1
    mtp = plan_of(spec_of(tmp_path, vllm_model(speculative={"method": "mtp", "tokens": 1})))
    (w,) = mtp.workers
    assert speculative_config(VLLM().serve_flags(w, mtp.model(w.model), "h", 1)) == {
        "method": "mtp",
        "num_speculative_tokens": 1,
    }
    compose = yaml.safe_load(render_all(mtp)["ws/compose.yaml"])
    command = compose["services"][w.name]["command"]
    assert speculative_config(command) == {"method": "mtp", "num_speculative_tokens": 1}
    # A draft model in vLLM's own form, for an image that has it (the check refuses it with the pinned 0.11).
    model = Model.model_validate(
        vllm_model(
            speculative={"method": "draft", "draft": {"huggingface": "org/small", "revision": "v2"}, "tokens": 3}
        )
    )
    assert VLLM.speculative_config(model) == {"model": "org/small", "num_speculative_tokens": 3, "revision": "v2"}
    plain = plan_of(spec_of(tmp_path, vllm_model()))
    (w,) = plain.workers
    assert "--speculative-config" not in VLLM().serve_flags(w, plain.model(w.model), "h", 1)


# -- llama.cpp ------------------------------------------------------------------------------------------------


def draft_spec(tmp_path: Path, draft: str = "small.gguf", device: str = "gpu", tokens: int = 4) -> Path:
    model = llama_model(tmp_path, speculative={"method": "draft", "draft": {"gguf": draft}, "tokens": tokens})
    if device == "cpu":
        model["device"] = "cpu"
    return spec_of(tmp_path, model, device)


def after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_a_llamacpp_container_gets_b6800s_draft_flags(tmp_path: Path) -> None:
    """The pinned image's flags: the draft beside the main model in the same mount, --draft-max, every draft layer
    on the GPU, and the main model's KV cache type for the draft's too."""
    plan = plan_of(draft_spec(tmp_path))
    (w,) = plan.workers
    args = LlamaCpp().container_args(w, plan.model(w.model), "/run/secrets/worker_key")
    assert after(args, "--model") == "/models/main.gguf"
    assert after(args, "--model-draft") == "/models/small.gguf"
    assert after(args, "--draft-max") == "4"
    assert after(args, "--gpu-layers-draft") == "999"
    assert after(args, "--cache-type-k-draft") == after(args, "--cache-type-v-draft") == "q8_0"
    assert after(args, "--cache-type-k") == "q8_0"
    assert "--spec-type" not in args and "--spec-draft-n-max" not in args  # b6800 has neither
    service = yaml.safe_load(render_all(plan)["ws/compose.yaml"])["services"][w.name]
    assert [v for v in service["volumes"] if ":/models" in v] == ["/var/lib/fleet/models:/models:ro"]


def test_a_draft_in_another_folder_is_mounted_on_its_own(tmp_path: Path) -> None:
    elsewhere = tmp_path / "drafts"
    elsewhere.mkdir()
    write_demo_model(elsewhere / "small.gguf")
    plan = plan_of(draft_spec(tmp_path, draft=str(elsewhere / "small.gguf")))
    (w,) = plan.workers
    args = LlamaCpp().container_args(w, plan.model(w.model), "/run/secrets/worker_key")
    assert after(args, "--model-draft") == "/models-draft/small.gguf"
    service = yaml.safe_load(render_all(plan)["ws/compose.yaml"])["services"][w.name]
    mounts = [v for v in service["volumes"] if ":/models" in v]
    assert mounts == ["/var/lib/fleet/models:/models:ro", f"{elsewhere}:/models-draft:ro"]
    quadlet = LlamaCpp().model_mounts(plan.model(w.model))
    assert quadlet == [("/var/lib/fleet/models", "/models"), (str(elsewhere), "/models-draft")]


def test_a_cpu_worker_puts_no_draft_layer_on_a_gpu(tmp_path: Path) -> None:
    plan = plan_of(draft_spec(tmp_path, device="cpu"))
    (w,) = plan.workers
    args = LlamaCpp().container_args(w, plan.model(w.model), "/k")
    assert "--model-draft" in args and "--gpu-layers-draft" not in args


def local_argv(plan: Plan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, help_text: str) -> list[str]:
    monkeypatch.setattr(processes, "find_program", lambda name: f"/opt/bin/{name}")
    monkeypatch.setattr(llamacpp, "_help", lambda binary: help_text)
    (w,) = plan.workers
    return processes.worker_process(plan, w, tmp_path, StateDir(tmp_path / "stack")).argv


def test_controller_up_speaks_the_installed_servers_dialect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A newer llama-server: --spec-type draft-simple (it speculates with a draft only when told to) and
    --spec-draft-n-max (--draft-max is an error there); b6800's: --draft-max. The draft resolved like the model."""
    plan = plan_of(draft_spec(tmp_path, tokens=7))
    new = local_argv(plan, tmp_path, monkeypatch, NEW_HELP)
    assert after(new, "--model-draft") == str((tmp_path / "small.gguf").resolve())
    assert after(new, "--model") == str((tmp_path / "main.gguf").resolve())
    assert after(new, "--spec-type") == "draft-simple" and after(new, "--spec-draft-n-max") == "7"
    assert "--draft-max" not in new
    assert after(new, "--cache-type-k-draft") == "q8_0" and after(new, "--gpu-layers-draft") == "999"
    old = local_argv(plan, tmp_path, monkeypatch, B6800_HELP)
    assert after(old, "--draft-max") == "7" and "--spec-type" not in old and "--spec-draft-n-max" not in old


def test_ngram_needs_a_server_that_has_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """n-gram speculation: `--spec-type ngram-simple` with `tokens` as its draft length where the installed
    llama-server has it; a clear error where it has not, and for the pinned image (b6800) in containers."""
    plan = plan_of(spec_of(tmp_path, llama_model(tmp_path, speculative={"method": "ngram", "tokens": 6})))
    argv = local_argv(plan, tmp_path, monkeypatch, NEW_HELP)
    assert after(argv, "--spec-type") == "ngram-simple" and after(argv, "--spec-ngram-simple-size-m") == "6"
    assert "--model-draft" not in argv
    with pytest.raises(ControllerError, match=r"method ngram needs a llama-server with n-gram speculation"):
        local_argv(plan, tmp_path, monkeypatch, B6800_HELP)
    with pytest.raises(RenderError, match=r"the pinned image's \(b6800\) has none: use method draft"):
        render_all(plan)


def test_dialect_of_the_installed_llama_server() -> None:
    """The real `--help` of the llama-server `controller up` would run (skipped where there is none)."""
    from tests.llama import llama_server

    binary = llama_server()
    llamacpp._help.cache_clear()
    assert llamacpp.dialect_of(binary) in ("b6800", "spec-type")
    assert "--model-draft" in llamacpp._help(binary)  # both spellings of llama-server take it
