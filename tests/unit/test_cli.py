"""The CLI as a user meets it: exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import jsonschema
import yaml

from controller.cli.schema import fleet_schema
from controller.gateway.keystore import KeyStore
from controller.local import logcap
from controller.local.demo import DEMO_KEY_LIFETIME_S, DEMO_USER, demo_key
from controller.local.demo_model import printable_byte, vocabulary
from controller.local.state import StateDir, start_time
from tests.conftest import ROOT
from tests.helpers import MINIMAL, write_spec


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
        env={**os.environ, **(env or {})},
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
        "compute GiB",
        "graphs GiB",
        "overhead GiB",
        "headroom GiB",
        "tower",
        "den",
        "gpu_memory_utilization=0.6 ",
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


def test_a_usage_error_is_said_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    """An unknown option, and a value the command itself refuses (typer.BadParameter): click's message, exit 2."""
    spec = str(ROOT / "examples" / "team.yaml")
    for args, said in (
        (("plan", spec, "--bogus"), "No such option: --bogus"),
        (("deploy", spec, "--image", f"x={tmp_path / 'none.tar'}"), "give TAG=ARCHIVE with an existing archive file"),
    ):
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert said in result.stderr and "Traceback" not in result.stderr, result.stderr


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


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_render_dry_run_writes_nothing_and_exits_1_when_something_would_change(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    spec = write_spec(tmp_path / "f.yaml", data)
    out = tmp_path / "out"
    assert cli("render", str(spec), "-o", str(out)).returncode == 0
    same = cli("render", str(spec), "-o", str(out), "--dry-run")
    assert same.returncode == 0 and "up to date; nothing written" in same.stdout, same.stdout + same.stderr
    (out / "ws" / "compose.yaml").write_text("edited\n")
    data["hosts"][0]["runtime"] = "quadlet"  # compose.yaml becomes stale, Quadlet units appear
    write_spec(spec, data)
    before = snapshot(out)
    for flag in ("--diff", "--dry-run"):
        result = cli("render", str(spec), "-o", str(out), flag)
        assert result.returncode == 1, result.stderr
        assert "+++ b/ws/quadlet/fleet-m8b-ws-gpu0.container" in result.stdout
        assert "--- a/ws/compose.yaml\n+++ /dev/null (removed)" in result.stdout
        assert "nothing written" in result.stdout
        assert snapshot(out) == before, f"{flag} changed the output folder"
    nowhere = tmp_path / "never"
    assert cli("render", str(spec), "-o", str(nowhere), "--diff").returncode == 1
    assert not nowhere.exists()


def test_render_help_says_what_each_flag_does() -> None:
    result = cli("render", "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--dry-run,--diff" in text and "print a unified diff of what a render would change" in text
    assert "exit 1 if anything would change, 0 if nothing would" in text
    assert "list each file that differs" in text


def process_table(state: StateDir, rows: Mapping[str, Mapping[str, object]]) -> None:
    """A process table as a supervisor leaves it, with no supervisor running."""
    state.create()
    defaults = {"kind": "worker", "restarts": 0, "gpus": [], "model": "tiny-chat", "ports": [], "held": False}
    state.write_json(state.table, {"processes": {n: {**defaults, **r} for n, r in rows.items()}})


def test_status_of_a_stopped_stack_shows_it_stopped_with_whole_names_at_80_columns(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    me = os.getpid()
    # What an older supervisor left after `down`: health and uptime of processes long gone. And one that still runs.
    gone = {"state": "stopped", "health": "healthy", "pid": None, "started": None, "up_since": time.time() - 600}
    process_table(
        state,
        {
            "tiny-chat-local-cpu-1": gone,
            "tiny-embed-local-cpu-1": {**gone, "model": "tiny-embed"},
            "envoy": {**gone, "kind": "envoy", "model": None, "state": "healthy", "pid": 1, "started": 1},
            "tiny-chat-local-cpu-2": {**gone, "state": "healthy", "pid": me, "started": start_time(me)},
        },
    )
    result = cli("status", "--state-dir", str(state.root), env={"COLUMNS": "80"})
    assert result.returncode == 1, result.stderr
    assert "not running" in result.stdout
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.split()}
    table = result.stdout.splitlines()[1:]  # the first line names the state folder, whole, however long
    assert table and all(len(line) <= 80 for line in table), result.stdout
    for name in ("tiny-chat-local-cpu-1", "tiny-embed-local-cpu-1", "envoy"):
        assert rows[name][1] == "stopped" and rows[name][-1] == "-", f"{name}: {rows[name]}"
    assert rows["tiny-chat-local-cpu-2"][1] == "orphaned" and str(me) in rows["tiny-chat-local-cpu-2"]
    assert "healthy" not in result.stdout
    as_json = json.loads(cli("status", "--json", "--state-dir", str(state.root)).stdout)["processes"]
    assert as_json["envoy"] | {"state": "stopped", "health": "down", "pid": None, "up_since": None} == as_json["envoy"]


def test_demo_key_is_minted_once_and_reused(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.create()
    first = demo_key(state)
    second = demo_key(state)
    assert not first.reused and second.reused and second.key == first.key
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(first.path.parent.stat().st_mode) == 0o700
    store = KeyStore(state.gatekeeper / "keys.db")
    try:
        keys = store.list()
        assert [(k.user, k.label) for k in keys] == [(DEMO_USER, "demo")]
        assert keys[0].expires is not None and abs(keys[0].expires - time.time() - DEMO_KEY_LIFETIME_S) < 60
        assert store.check(first.key) is not None
        store.revoke(first.record.id)  # a revoked demo key is replaced
        third = demo_key(state)
        assert not third.reused and third.key != first.key and store.check(third.key) is not None
        # Near its expiry it is replaced too, and the old one stops working: one demo key at a time.
        fourth = demo_key(state, now=time.time() + DEMO_KEY_LIFETIME_S - 3600)
        assert not fourth.reused and store.check(third.key) is None
        assert [k.id for k in store.list() if k.active()] == [fourth.record.id]
    finally:
        store.close()


def test_demo_model_generates_only_printable_text() -> None:
    """Only tokens that decode to themselves are byte tokens: newline and printable ASCII. The rest (control
    characters, UTF-8 bytes) are normal tokens named <0xNN>, and the words are printable too, so whatever the model
    generates is. The real model's output: tests/e2e/test_stack_cli.py."""
    from gguf import TokenType

    tokens, types = vocabulary()
    for token, kind in zip(tokens, types, strict=True):
        if kind == TokenType.BYTE:
            assert printable_byte(int(token[3:5], 16)), token
        elif kind == TokenType.NORMAL:
            assert token.replace("▁", " ").isprintable(), token
    assert sum(kind == TokenType.BYTE for kind in types) == 96  # "\n" and " " to "~"
    assert [f"<0x{b:02X}>" for b in range(256)] == tokens[4:260]  # llama.cpp's byte fallback finds every byte by name
    assert len(set(tokens)) == len(tokens) > 2000
    assert not [t for t in tokens if len(t) == 2], "a two-character token would merge a prompt's characters"


def test_a_log_past_its_cap_keeps_its_newest_lines(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    with log.open("ab") as out:  # O_APPEND, as the supervisor opens a process's log
        for i in range(3000):
            out.write(f"line {i:05d} {'x' * 90}\n".encode())
        out.flush()
        assert logcap.cap(log, 100_000)
        assert log.stat().st_size == 0 and logcap.older(log).stat().st_size <= 100_000
        out.write(b"after the cut\n")  # the writer goes on where the file now ends
        out.flush()
    assert log.read_bytes() == b"after the cut\n"
    kept = logcap.older(log).read_text().splitlines()
    assert kept[-1].startswith("line 02999") and all(line.startswith("line ") for line in kept)
    assert logcap.tail_lines(log, 3) == [f"{kept[-2]}\n", f"{kept[-1]}\n", "after the cut\n"]
    assert not logcap.cap(log, 100_000)  # under its cap: left alone
