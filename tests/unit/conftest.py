"""The unit tier: no stacks and no daemons, so each test has a tighter bound than the suite's 300 s default."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent
# The slowest unit tests run the CLI in a subprocess (render, status): about 7 s on a loaded 2-core machine.
UNIT_TIMEOUT_S = 60


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(UNIT_TIMEOUT_S))
