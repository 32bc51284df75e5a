"""The CLI as a user meets it: exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

from controller.cli.schema import fleet_schema
from tests.conftest import ROOT
from tests.helpers import MINIMAL, write_spec


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def test_validate_example_ok(example: Path) -> None:
    result = cli("validate", str(example))
    assert result.returncode == 0, result.stderr
    assert ": ok — fleet " in result.stdout


def test_plan_json_is_machine_readable(example: Path) -> None:
    result = cli("plan", str(example), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["workers"] and all({"name", "host", "gpus", "estimate", "port"} <= set(w) for w in data["workers"])


def test_plan_table_shows_terms_and_headroom() -> None:
    result = cli("plan", str(ROOT / "examples" / "homelab.yaml"))
    assert result.returncode == 0, result.stderr
    for text in (
        "weights GiB",
        "kv cache GiB",
        "overhead GiB",
        "headroom GiB",
        "tower",
        "den",
        "gpu_memory_utilization=0.57",
    ):
        assert text in result.stdout


def test_bad_input_is_one_line_exit_2_no_traceback_nothing_written(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["contxt"] = 1
    del data["models"][0]["context"]
    spec = write_spec(tmp_path / "f.yaml", data)
    out = tmp_path / "out"
    result = cli("render", str(spec), "-o", str(out))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert "did you mean `context`?" in result.stderr and "models[0].context: required; add it" in result.stderr
    assert not out.exists()


def test_model_that_fits_nowhere_exit_2(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["context"] = 131072
    spec = write_spec(tmp_path / "f.yaml", data)
    result = cli("plan", str(spec))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no GPU has room" in result.stderr
    assert "Traceback" not in result.stderr


def test_render_then_check_then_drift(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "f.yaml", MINIMAL)
    out = tmp_path / "out"
    first = cli("render", str(spec), "-o", str(out), "--json")
    assert first.returncode == 0, first.stderr
    files = json.loads(first.stdout)["files"]
    assert "ws/compose.yaml" in files and "ws/envoy/envoy.yaml" in files and "ws/caddy/Caddyfile" in files
    assert cli("render", str(spec), "-o", str(out), "--check").returncode == 0
    (out / "ws" / "compose.yaml").write_text("edited\n")
    drift = cli("render", str(spec), "-o", str(out), "--check")
    assert drift.returncode == 1 and "differs: " in drift.stdout
    assert (out / "ws" / "compose.yaml").read_text() == "edited\n"  # --check writes nothing


def test_render_removes_files_it_no_longer_produces(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    spec = write_spec(tmp_path / "f.yaml", data)
    out = tmp_path / "out"
    assert cli("render", str(spec), "-o", str(out)).returncode == 0
    assert (out / "ws" / "compose.yaml").exists()
    data["hosts"][0]["runtime"] = "quadlet"
    write_spec(spec, data)
    check = cli("render", str(spec), "-o", str(out), "--check")
    assert check.returncode == 1 and "stale: " in check.stdout
    assert cli("render", str(spec), "-o", str(out)).returncode == 0
    assert not (out / "ws" / "compose.yaml").exists()
    assert (out / "ws" / "quadlet" / "fleet-m8b-ws-gpu0.container").exists()


def test_render_leaves_no_temporary_files(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "f.yaml", MINIMAL)
    out = tmp_path / "out"
    assert cli("render", str(spec), "-o", str(out)).returncode == 0
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") and p.name != ".fleet-render.json"]
    assert leftovers == []


def test_schema_matches_examples_and_committed_copy(example: Path) -> None:
    result = cli("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema == fleet_schema()
    committed = json.loads((ROOT / "schema" / "fleet.schema.json").read_text())
    assert committed == schema, "schema/fleet.schema.json is stale: run `controller schema > schema/fleet.schema.json`"
    jsonschema.validate(yaml.safe_load(example.read_text()), schema)


def test_schema_rejects_what_the_loader_rejects() -> None:
    data = copy.deepcopy(MINIMAL)
    data["models"][0]["contxt"] = 1
    errors = list(jsonschema.Draft202012Validator(fleet_schema()).iter_errors(data))
    assert errors, "the generated schema forbids unknown keys too"
