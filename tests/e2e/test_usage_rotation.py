"""The usage log is kept small by rotation, with the real Envoy (its /reopen_logs) and the real gatekeeper, and no
request goes unmetered: a stack whose limit is a few kilobytes serves a steady run of requests while its log
is rotated again and again (controller/gateway/rotation.py)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing

import pytest

from controller.gateway.rotation import MAX_BYTES_ENV, ROTATED
from tests.e2e.stack import Stack, running_stack
from tests.e2e.test_metering import auth, chat_body
from tests.stubs import wait_until

pytestmark = pytest.mark.e2e

LIMIT = 8192  # bytes: a rotation every dozen requests or so
REQUESTS = 150


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("rotation"), env={MAX_BYTES_ENV: str(LIMIT)}) as running:
        yield running


def recorded(stack: Stack, ids: list[str]) -> int:
    with closing(sqlite3.connect(stack.state.gatekeeper / "usage.db")) as db:
        marks = ",".join("?" * len(ids))
        return int(db.execute(f"SELECT COUNT(*) FROM usage WHERE request_id IN ({marks})", ids).fetchone()[0])


def rotations(stack: Stack) -> int:
    return stack.state.log("gatekeeper").read_text().count("usage log rotated at")


def test_every_request_is_metered_while_the_usage_log_is_rotated(stack: Stack) -> None:
    """Requests keep coming through two rotations (each waits for the last one's old file to be read and removed),
    so lines land in the old file after its rename and in the new one after Envoy reopened."""
    log = stack.state.usage_log
    ids: list[str] = []
    deadline = time.monotonic() + 60
    with stack.http() as client:
        while rotations(stack) < 2 or len(ids) < REQUESTS:
            assert time.monotonic() < deadline, f"{rotations(stack)} rotations after {len(ids)} requests"
            reply = client.post(f"{stack.base_url}/chat/completions", json=chat_body(1), headers=auth(stack.key))
            assert reply.status_code == 200, reply.text
            ids.append(reply.headers["x-request-id"])
    old = log.with_name(log.name + ROTATED)
    wait_until(lambda: recorded(stack, ids) == len(ids), 30, "every request in the ledger")
    # Rotated until small, then the last old file read to its end and removed (SETTLE_S after Envoy reopened).
    wait_until(lambda: not old.exists() and log.stat().st_size < LIMIT, 60, "the usage log rotated below its limit")
    said = stack.state.log("gatekeeper").read_text()
    print(f"\n[rotation] {len(ids)} requests, {rotations(stack)} rotations at {LIMIT} bytes, all metered")
    assert said.count("read to its end") >= 2, said[-2000:]
    assert recorded(stack, ids) == len(ids)
    live = log.with_name("live.log")
    assert not live.with_name(live.name + ROTATED).exists()
    assert stack.openai().models.list().data, "the stack still serves"
