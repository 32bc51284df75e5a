"""Rendered output of each example, kept under tests/golden/ so changes show in review.

Refresh after an intended change with `pytest tests/test_golden.py --update-golden`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from controller.plan import Plan
from controller.render import render_all
from tests.conftest import GOLDEN


def test_golden(example: Path, example_plan: Plan, request: pytest.FixtureRequest) -> None:
    files = render_all(example_plan)
    folder = GOLDEN / example.stem
    if request.config.getoption("--update-golden"):
        shutil.rmtree(folder, ignore_errors=True)
        for rel, text in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text, encoding="utf-8")
    on_disk = {
        str(p.relative_to(folder)): p.read_text(encoding="utf-8") for p in sorted(folder.rglob("*")) if p.is_file()
    }
    assert sorted(on_disk) == sorted(files), "files added or removed; run with --update-golden if intended"
    for rel, text in files.items():
        assert on_disk[rel] == text, f"{rel} differs from tests/golden; run with --update-golden if intended"


def test_render_is_deterministic(example_plan: Plan) -> None:
    assert render_all(example_plan) == render_all(example_plan)
