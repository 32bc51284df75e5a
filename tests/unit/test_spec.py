"""The spec loader: valid examples load; each bad input gives one pointed error."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from controller.errors import SpecError
from controller.spec import load_spec
from tests.helpers import MINIMAL, spec_with, write_spec


def problems(path: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value.lines()


def test_examples_load(example: Path) -> None:
    spec = load_spec(example)
    assert spec.fleet.models, "every example serves at least one model"


def test_unknown_key_names_line_and_suggests(tmp_path: Path) -> None:
    text = (tmp_path / "x").with_suffix(".yaml")
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["contxt"] = 4096
    write_spec(text, data)
    lines = problems(text)
    assert len(lines) == 1
    line_no = next(i for i, row in enumerate(text.read_text().splitlines(), 1) if "contxt" in row)
    assert lines[0].startswith(f"{text}:{line_no}: models[0].contxt: unknown key 'contxt'; did you mean `context`?")


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path: Path) -> None:
    path = write_spec(tmp_path / "f.yaml", spec_with(mesh={"kind": "none", "zzzz": 1}))
    (line,) = problems(path)
    assert "mesh.zzzz: unknown key 'zzzz'; valid keys: interface, kind, listen_port, subnet" in line


def test_malformed_yaml_names_line(tmp_path: Path) -> None:
    path = write_spec(tmp_path / "f.yaml", text="version: 1\nname: [unclosed\nmesh: {kind: none}\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}:3: malformed YAML")


def test_tab_indentation_is_called_out(tmp_path: Path) -> None:
    path = write_spec(tmp_path / "f.yaml", text="version: 1\nmesh:\n\tkind: none\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}:3: tab character")
    assert "indentation must use spaces" in line


def test_duplicate_key(tmp_path: Path) -> None:
    path = write_spec(tmp_path / "f.yaml", text="version: 1\nname: a\nname: b\n")
    (line,) = problems(path)
    assert line == f"{path}:3: duplicate key 'name' (first defined on line 2); keep one"


def test_not_a_mapping(tmp_path: Path) -> None:
    path = write_spec(tmp_path / "f.yaml", text="- just\n- a list\n")
    (line,) = problems(path)
    assert "the spec must be a mapping" in line


def test_missing_file(tmp_path: Path) -> None:
    (line,) = problems(tmp_path / "nope.yaml")
    assert "no such file" in line


def test_wrong_type_shows_value(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["hosts"][0]["runtime"] = "docker"
    path = write_spec(tmp_path / "f.yaml", data)
    (line,) = problems(path)
    assert "hosts[0].runtime: Input should be 'compose' or 'quadlet' (got 'docker')" in line


def test_bad_gpu_uuid(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["hosts"][0]["gpus"][1]["uuid"] = "GPU-1234"
    path = write_spec(tmp_path / "f.yaml", data)
    (line,) = problems(path)
    assert "hosts[0].gpus[1].uuid: 'GPU-1234' is not valid: The GPU's UUID as `nvidia-smi -L` prints it" in line


def test_duplicate_names(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"].append(copy.deepcopy(data["models"][0]))
    path = write_spec(tmp_path / "f.yaml", data)
    lines = problems(path)
    assert any("models[1].name: model m8b: defined twice (also models[0])" in x for x in lines)


def test_gpu_uuid_claimed_twice(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["hosts"][0]["gpus"][1]["uuid"] = data["hosts"][0]["gpus"][0]["uuid"]
    path = write_spec(tmp_path / "f.yaml", data)
    (line,) = problems(path)
    assert (
        "hosts[0].gpus[1].uuid: host ws: GPU GPU-00000000-0000-4000-8000-000000000001 is already claimed by host ws gpus[0]"
        in line
    )


def test_user_granted_unknown_model(tmp_path: Path) -> None:
    path = write_spec(tmp_path / "f.yaml", spec_with(users=[{"name": "kid", "models": ["m70b"]}]))
    (line,) = problems(path)
    assert "users[0].models[0]: user kid: granted unknown model 'm70b'; known: m8b" in line


def test_user_in_unknown_group(tmp_path: Path) -> None:
    path = write_spec(tmp_path / "f.yaml", spec_with(users=[{"name": "kid", "groups": ["kids"]}]))
    (line,) = problems(path)
    assert "users[0].groups[0]: user kid: unknown group 'kids'" in line


def test_pin_to_unknown_host_and_gpu(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["placement"] = [{"host": "nas"}, {"host": "ws", "gpus": [7]}]
    path = write_spec(tmp_path / "f.yaml", data)
    lines = problems(path)
    assert any("models[0].placement[0].host: model m8b: pinned to unknown host 'nas'" in x for x in lines)
    assert any("models[0].placement[1].gpus[0]: model m8b: host ws has no GPU 7" in x for x in lines)


def test_backend_source_mismatch(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["source"] = {"ollama": "llama3.1:8b"}
    path = write_spec(tmp_path / "f.yaml", data)
    (line,) = problems(path)
    assert "model m8b: backend vllm needs a huggingface source, not ollama" in line


def test_reserved_option_refused(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["options"] = {"gpu-memory-utilization": 0.99, "enforce-eager": True}
    path = write_spec(tmp_path / "f.yaml", data)
    (line,) = problems(path)
    assert "models[0].options.gpu-memory-utilization: model m8b: 'gpu-memory-utilization' is set by the plan" in line


def llamacpp_model(**fields: object) -> dict[str, object]:
    return {
        "name": "rr",
        "backend": "llamacpp",
        "device": "cpu",
        "source": {"gguf": "/m/rr.gguf"},
        "context": 512,
        "arch": {"layers": 2, "kv_heads": 2, "head_dim": 16, "params_b": 0.001},
        **fields,
    }


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            {"backend": "ollama", "source": {"ollama": "bge-reranker"}, "task": "rerank"},
            "models[1].task: model rr: Ollama serves no rerank API; run the reranker with backend llamacpp or vllm",
        ),
        ({"options": {"embeddings": True}}, "models[1].options.embeddings: model rr: 'embeddings' is set by the plan"),
        ({"options": {"reranking": True}}, "models[1].options.reranking: model rr: 'reranking' is set by the plan"),
        (
            {"task": "rerank", "options": {"pooling": "mean"}},
            "models[1].options.pooling: model rr: a reranker's pooling is rank (task: rerank); remove it",
        ),
        ({"task": "classify"}, "models[1].task: Input should be 'generate', 'embed' or 'rerank'"),
    ],
    ids=["ollama-rerank", "embeddings-option", "reranking-option", "rerank-pooling", "unknown-task"],
)
def test_a_task_the_backend_cannot_serve_is_refused(tmp_path: Path, model: dict[str, object], expected: str) -> None:
    data = copy.deepcopy(MINIMAL)
    data["hosts"][0]["cpu_workers"] = 1
    data["models"].append(llamacpp_model(**model))
    (line,) = problems(write_spec(tmp_path / "f.yaml", data))
    assert expected in line, line


def test_option_with_newline_refused(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["options"] = {"chat-template": "x\n--api-key y"}
    path = write_spec(tmp_path / "f.yaml", data)
    (line,) = problems(path)
    assert "contains a control character" in line


def test_many_problems_reported_at_once_sorted(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["gateway"]["host"] = "nowhere"
    data["users"] = [{"name": "kid", "models": ["nope"]}]
    path = write_spec(tmp_path / "f.yaml", data)
    lines = problems(path)
    assert len(lines) == 2
    assert lines == sorted(lines, key=lambda x: int(x.split(":")[1]))


def test_hosts_file_errors_point_into_that_file(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(
        "hosts:\n  - name: ws\n    address: 127.0.0.1\n    gpus:\n      - uuid: nope\n        name: x\n        vram_gib: 8\n"
    )
    data = copy.deepcopy(MINIMAL)
    del data["hosts"]
    data["hosts_file"] = "hosts.yaml"
    path = write_spec(tmp_path / "f.yaml", data)
    (line,) = problems(path)
    assert line.startswith(f"{hosts}:5: hosts[0].gpus[0].uuid:")


def test_mesh_none_needs_loopback(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["hosts"][0]["address"] = "192.0.2.10"
    path = write_spec(tmp_path / "f.yaml", data)
    (line,) = problems(path)
    assert "use 127.0.0.1" in line


def test_wireguard_address_outside_subnet(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["mesh"] = {"kind": "wireguard", "subnet": "10.77.0.0/24"}
    data["hosts"][0]["address"] = "10.78.0.1"
    path = write_spec(tmp_path / "f.yaml", data)
    (line,) = problems(path)
    assert "address 10.78.0.1 is outside the mesh subnet 10.77.0.0/24" in line


# -- architecture from files ------------------------------------------------------


def _tiny_gguf(path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(256)
    writer.add_tensor("token_embd.weight", np.zeros((260, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_arch_read_from_local_gguf(tmp_path: Path) -> None:
    model_file = _tiny_gguf(tmp_path / "tiny.gguf")
    data = copy.deepcopy(MINIMAL)
    data["models"] = [
        {
            "name": "tiny",
            "backend": "llamacpp",
            "source": {"gguf": "tiny.gguf"},
            "context": 256,
        }
    ]
    spec = load_spec(write_spec(tmp_path / "f.yaml", data))
    arch = spec.fleet.models[0].arch
    assert (arch.layers, arch.kv_heads, arch.head_dim) == (2, 2, 16)
    assert arch.params_b == pytest.approx(260 * 64 / 1e9)
    # The tensors at their own types (here one f32 embedding, tied, so also the output layer on the GPU)
    assert arch.weights_gib == pytest.approx(260 * 64 * 4 / 1024**3) and model_file.stat().st_size > 260 * 64 * 4
    assert arch.max_context == 256 and arch.heads == 4 and arch.hidden_size == 64 and arch.tied_embeddings


def test_arch_from_config_json_and_spec_wins(tmp_path: Path) -> None:
    config = {
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["arch"] = {"layers": 30}
    data["models"][0]["arch_from"] = "config.json"
    spec = load_spec(write_spec(tmp_path / "f.yaml", data))
    arch = spec.fleet.models[0].arch
    assert arch.layers == 30  # the spec's number wins
    assert (arch.kv_heads, arch.head_dim) == (4, 128)
    # Qwen2.5-7B has 7.62B parameters; the dense formula lands within 1%.
    assert arch.params_b is not None and abs(arch.params_b - 7.62) / 7.62 < 0.01


def test_arch_missing_numbers(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["arch"] = {"layers": 32}
    path = write_spec(tmp_path / "f.yaml", data)
    (line,) = problems(path)
    assert "model m8b: unknown kv_heads, head_dim, params_b" in line


def test_a_fleet_of_more_than_2048_hosts_is_refused_with_the_bound(tmp_path: Path) -> None:
    """The spec holds fleets of up to 2,048 hosts (bench/control_plane.py plans and renders 1,000); past that, one
    line names the field and the bound."""
    hosts = [
        {"name": f"h{i}", "address": f"10.80.{i // 250}.{i % 250 + 2}", "ssh": f"ops@h{i}", "endpoint": f"h{i}:51820"}
        for i in range(2049)
    ]
    data = spec_with(mesh={"kind": "wireguard", "subnet": "10.80.0.0/16", "listen_port": 51820}, hosts=hosts)
    data["gateway"] = {**data["gateway"], "host": "h0"}
    data["models"] = [{**data["models"][0], "backend": "llamacpp", "source": {"gguf": "m.gguf"}, "device": "cpu"}]
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(tmp_path / "f.yaml", data))
    (line,) = caught.value.lines()
    assert "hosts: List should have at most 2048 items" in line and "not 2049" in line
