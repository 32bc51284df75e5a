"""Shared fixtures: the examples, the real programs the tests drive, golden files.

A program the tests need but cannot find is a skip that prints why; with
FLEET_REQUIRE_TOOLS=1 (set by `scripts/test` and CI) it is a failure
instead, so CI can never go green by skipping the real checks. Where the
machine decides which of two checks runs (podman's Quadlet generator or a
structural check), the test says which with `note`, printed at the end of
every run under "which checks ran".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controller.plan import Plan, make_plan
from controller.render import render_all
from controller.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml") if not p.name.endswith("-hosts.yaml"))
GOLDEN = ROOT / "tests" / "golden"
VENV_BIN = Path(sys.executable).parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="Rewrite tests/golden from the current renderers.")


# A test's notes travel in its user_properties (so JUnit XML keeps them too) under this name.
NOTE = "fleet-note"


@pytest.fixture
def note(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``note(line)``: say which check ran where the machine decides; printed under "which checks ran" at the end of
    the run, whether the test passed or not."""

    def add(line: str) -> None:
        request.node.user_properties.append((NOTE, line))

    return add


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = [
        f"{report.nodeid}: {value}"
        for reports in terminalreporter.stats.values()
        for report in reports
        if isinstance(report, pytest.TestReport) and report.when == "call"
        for key, value in report.user_properties
        if key == NOTE
    ]
    if lines:
        terminalreporter.section("which checks ran", sep="-")
        for line in lines:
            terminalreporter.write_line(line)


def need_tool(name: str, hint: str) -> str:
    """Path of a program the test needs; skip (or fail under FLEET_REQUIRE_TOOLS=1) with the reason."""
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found:
        return found
    reason = f"{name} not found; {hint}"
    if os.environ.get("FLEET_REQUIRE_TOOLS") == "1":
        pytest.fail(reason + " (FLEET_REQUIRE_TOOLS=1)")
    pytest.skip(reason)


@pytest.fixture(params=EXAMPLES, ids=[p.stem for p in EXAMPLES])
def example(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


@pytest.fixture
def example_plan(example: Path) -> Plan:
    return make_plan(load_spec(example))


@pytest.fixture
def rendered(example_plan: Plan, tmp_path: Path) -> Iterator[Path]:
    """The example's files, written to a temporary folder."""
    for rel, text in render_all(example_plan).items():
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    yield tmp_path


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kwargs)  # type: ignore[call-overload,no-any-return]
