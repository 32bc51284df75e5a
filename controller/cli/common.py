"""Helpers shared by the CLI verbs: loading, JSON output, consoles."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from controller.local.state import StateDir, default_state_dir
from controller.plan import Plan, make_plan
from controller.spec import LoadedSpec, load_spec

SpecArg = Annotated[Path, typer.Argument(help="The fleet spec (fleet.yaml).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]
StateOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Folder of the local stack's state (default: $FLEET_STATE_DIR or ~/.local/state/fleet).",
        show_default=False,
    ),
]


def state_dir(option: Path | None) -> StateDir:
    return StateDir(option or default_state_dir())


def load(path: Path) -> LoadedSpec:
    return load_spec(path)


def load_plan(path: Path) -> Plan:
    return make_plan(load_spec(path))


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def console() -> Console:
    # A terminal's width, or $COLUMNS where set; else (CI logs, pipes) wide enough for the plan table.
    wide = sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit()
    return Console(width=None if wide else 160, highlight=False, soft_wrap=False)
