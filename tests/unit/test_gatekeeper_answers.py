"""What the gatekeeper tells Envoy about reusing its answers (the real app, in process)."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from controller.gateway.gatekeeper import create_app
from controller.gateway.keystore import KeyStore
from tests.helpers import MINIMAL, write_spec


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], KeyStore]]:
    data = copy.deepcopy(MINIMAL)
    data["auth"] = {"revocation_delay_s": 2}
    data["users"] = [{"name": "me", "models": ["*"]}, {"name": "slow", "models": ["*"], "rpm": 120}]
    spec = write_spec(tmp_path / "fleet.yaml", data)
    store = KeyStore(tmp_path / "keys.db")
    keys = {user: store.create(user)[0] for user in ("me", "slow")}
    with TestClient(create_app(spec, tmp_path)) as client:
        yield client, keys, store
    store.close()


def check(client: TestClient, key: str) -> tuple[int, dict[str, str]]:
    reply = client.get("/auth/check", headers={"Authorization": f"Bearer {key}"})
    return reply.status_code, dict(reply.headers)


def test_a_key_answer_may_be_reused_until_the_gatekeepers_own_lookup_expires(
    setup: tuple[TestClient, dict[str, str], KeyStore],
) -> None:
    client, keys, _ = setup
    status, first = check(client, keys["me"])
    assert status == 200 and first["x-fleet-user"] == "me"
    assert 0 < int(first["x-fleet-cache-ms"]) <= 2000  # never beyond the revocation delay
    assert "x-fleet-grant" not in first  # no rate: the answer carries any number of requests
    time.sleep(0.3)
    _, again = check(client, keys["me"])
    # The same cached lookup: what is left of it, not a fresh 2 s on top.
    assert int(again["x-fleet-cache-ms"]) <= int(first["x-fleet-cache-ms"]) - 250


def test_a_revoked_key_is_refused_once_the_reuse_window_ends(
    setup: tuple[TestClient, dict[str, str], KeyStore],
) -> None:
    client, keys, store = setup
    _, answer = check(client, keys["me"])
    store.revoke(keys["me"].split("-")[2])
    time.sleep(int(answer["x-fleet-cache-ms"]) / 1000 + 0.05)
    assert check(client, keys["me"])[0] == 401


def test_a_rated_user_gets_a_lease_taken_from_their_bucket(setup: tuple[TestClient, dict[str, str], KeyStore]) -> None:
    client, keys, _ = setup
    served = 0
    leases: list[tuple[int, int]] = []  # (granted, what the reuse window refills: 2 requests/s × its seconds)
    while True:
        status, headers = check(client, keys["slow"])
        if status != 200:
            break
        grant = int(headers["x-fleet-grant"])
        leases.append((grant, max(1, int(2 * int(headers["x-fleet-cache-ms"]) / 1000))))
        served += grant
    # Each lease carries what the rate refills while Envoy may reuse the answer; only the last one or two,
    # when the bucket runs low, carry less.
    assert all(granted == full for granted, full in leases[:-2]), leases
    assert all(1 <= granted <= full for granted, full in leases[-2:]), leases
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert 120 <= served <= 121  # the whole burst, handed out in leases, and not one request more (plus refill)


def test_sessions_and_refusals_are_not_reusable(setup: tuple[TestClient, dict[str, str], KeyStore]) -> None:
    client, _, _ = setup
    reply = client.get("/auth/check", headers={"Authorization": "Bearer sk-fleet-000000000000-nope"})
    assert reply.status_code == 401 and "x-fleet-cache-ms" not in reply.headers
    reply = client.get("/auth/check", headers={"Cookie": "fleet_session=whatever"})
    assert reply.status_code == 401 and "x-fleet-cache-ms" not in reply.headers
