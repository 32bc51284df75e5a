"""What the gatekeeper tells Envoy about reusing its answers (the real app, in process)."""

from __future__ import annotations

import copy
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from controller.gateway.gatekeeper import ANSWER_MAX_S, LEASE_LONG_S, LEASE_S, SYNC_OVERLAP_S, create_app
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


def test_a_key_answer_may_be_kept_long_but_never_past_the_keys_expiry(
    setup: tuple[TestClient, dict[str, str], KeyStore],
) -> None:
    """Envoy keeps a key's answer up to ANSWER_MAX_S: revocations reach it through /auth/sync instead."""
    client, keys, store = setup
    status, first = check(client, keys["me"])
    assert status == 200 and first["x-fleet-user"] == "me"
    assert int(first["x-fleet-cache-ms"]) == ANSWER_MAX_S * 1000
    assert "x-fleet-grant" not in first and "x-fleet-rpm" not in first  # no rate: nothing for Envoy to hold
    expiring, _ = store.create("me", expires=time.time() + 30)
    _, soon = check(client, expiring)
    assert 28_000 < int(soon["x-fleet-cache-ms"]) <= 30_000


def test_sync_names_the_keys_revoked_since_the_last_one_with_an_overlap(
    setup: tuple[TestClient, dict[str, str], KeyStore],
) -> None:
    client, keys, store = setup
    first = client.get("/auth/sync")
    assert first.status_code == 200 and first.headers["x-fleet-revoked"] == ""
    epoch, since = first.headers["x-fleet-epoch"], float(first.headers["x-fleet-since"])
    assert abs(since - time.time()) < 5
    gone = keys["me"].split("-")[2]
    store.revoke(gone)
    later = client.get("/auth/sync", headers={"X-Fleet-Since": first.headers["x-fleet-since"]})
    assert later.headers["x-fleet-revoked"] == gone and later.headers["x-fleet-epoch"] == epoch
    # Named again while within the overlap (a revocation the previous answer may have missed), not after it.
    again = client.get("/auth/sync", headers={"X-Fleet-Since": later.headers["x-fleet-since"]})
    assert again.headers["x-fleet-revoked"] == gone
    past = client.get("/auth/sync", headers={"X-Fleet-Since": f"{time.time() + SYNC_OVERLAP_S + 1:.3f}"})
    assert past.headers["x-fleet-revoked"] == ""
    assert client.get("/auth/sync", headers={"X-Fleet-Since": "soon"}).status_code == 400


def test_a_revoked_key_is_refused_once_the_gatekeepers_own_lookup_expires(
    setup: tuple[TestClient, dict[str, str], KeyStore],
) -> None:
    client, keys, store = setup
    assert check(client, keys["me"])[0] == 200
    store.revoke(keys["me"].split("-")[2])
    time.sleep(2.05)  # its lookup cache keeps a record at most the revocation delay (2 s here)
    assert check(client, keys["me"])[0] == 401


def test_no_revocation_delay_means_no_kept_answer(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["auth"] = {"revocation_delay_s": 0}
    data["users"] = [{"name": "me", "models": ["*"]}]
    spec = write_spec(tmp_path / "fleet.yaml", data)
    store = KeyStore(tmp_path / "keys.db")
    key, _ = store.create("me")
    with TestClient(create_app(spec, tmp_path)) as client:
        status, headers = check(client, key)
    store.close()
    assert status == 200 and "x-fleet-cache-ms" not in headers


def test_a_rated_users_answer_names_the_rate_envoy_holds(setup: tuple[TestClient, dict[str, str], KeyStore]) -> None:
    """The rate is Envoy's to hold (one bucket per user, tests/e2e/test_gatekeeper.py): the answer names it, is
    reusable like any key's, and the gatekeeper itself never refuses for it."""
    client, keys, _ = setup
    answers = [check(client, keys["slow"]) for _ in range(200)]  # more than the 120 a minute
    assert all(status == 200 for status, _ in answers)
    assert {h["x-fleet-rpm"] for _, h in answers} == {"120"} and all(int(h["x-fleet-cache-ms"]) > 0 for _, h in answers)
    assert not any("x-fleet-grant" in h for _, h in answers)
    assert "x-fleet-rpm" not in check(client, keys["me"])[1]


def test_sessions_and_refusals_are_not_reusable(setup: tuple[TestClient, dict[str, str], KeyStore]) -> None:
    client, _, _ = setup
    reply = client.get("/auth/check", headers={"Authorization": "Bearer sk-fleet-000000000000-nope"})
    assert reply.status_code == 401 and "x-fleet-cache-ms" not in reply.headers
    reply = client.get("/auth/check", headers={"Cookie": "fleet_session=whatever"})
    assert reply.status_code == 401 and "x-fleet-cache-ms" not in reply.headers


def test_a_lease_is_long_while_the_user_is_far_from_the_quota_and_short_near_it(tmp_path: Path) -> None:
    data = copy.deepcopy(MINIMAL)
    data["users"] = [{"name": "me", "models": ["*"], "daily_tokens": 1000}]
    spec = write_spec(tmp_path / "fleet.yaml", data)
    headers = {"X-Fleet-User": "me", "X-Fleet-Daily-Tokens": "1000"}
    with TestClient(create_app(spec, tmp_path)) as client:

        def reserve(tokens: int) -> dict[str, str]:
            reply = client.post("/auth/reserve", headers={**headers, "X-Fleet-Reserve": str(tokens)})
            assert reply.status_code == 200, reply.text
            return dict(reply.headers)

        first = reserve(10)  # a twentieth (50): 950 left beside it
        assert first["x-fleet-lease-tokens"] == "50" and first["x-fleet-lease-ms"] == str(int(LEASE_LONG_S * 1000))
        assert reserve(650)["x-fleet-lease-ms"] == str(int(LEASE_LONG_S * 1000))  # 300 left: still a quarter
        near = reserve(60)  # 240 left beside it: under a quarter of the quota
        assert near["x-fleet-lease-ms"] == str(int(LEASE_S * 1000))


def test_users_are_reloaded_in_place_when_the_spec_changes(tmp_path: Path) -> None:
    """Deploy replaces the spec by a rename: a new user's key works and a changed rate is answered within a
    couple of seconds, the epoch Envoy drops held answers by changes, and a spec that does not load keeps the
    previous one (the gatekeeper keeps answering)."""
    data = copy.deepcopy(MINIMAL)
    data["auth"] = {"revocation_delay_s": 2}
    data["users"] = [{"name": "me", "models": ["*"]}]
    spec = write_spec(tmp_path / "fleet.yaml", data)
    store = KeyStore(tmp_path / "keys.db")
    mine, _ = store.create("me")
    theirs, _ = store.create("new")  # a key made before its user is in the spec (as `keys create` allows)

    def epoch(client: TestClient) -> str:
        return client.get("/auth/sync", headers={"x-fleet-since": str(time.time())}).headers["x-fleet-epoch"]

    def until(predicate: Any) -> None:
        deadline = time.monotonic() + 10
        while not predicate():
            assert time.monotonic() < deadline, "the gatekeeper did not reload its spec within 10 s"
            time.sleep(0.1)

    with TestClient(create_app(spec, tmp_path)) as client:
        first = epoch(client)
        assert check(client, theirs)[0] == 401
        data["users"] = [{"name": "me", "models": ["*"], "rpm": 30}, {"name": "new", "models": ["*"]}]
        write_spec(tmp_path / "fleet.yaml.new", data).rename(spec)
        until(lambda: check(client, theirs)[0] == 200)
        assert check(client, mine)[1].get("x-fleet-rpm") == "30"
        second = epoch(client)
        assert second != first
        spec.write_text("version: 1\nname: [broken\n")
        time.sleep(2.5)  # two looks at the file
        assert check(client, theirs)[0] == 200 and epoch(client) == second
    store.close()


def test_a_keys_app_goes_to_envoy_with_its_identity_and_survives_a_rotation(
    setup: tuple[TestClient, dict[str, str], KeyStore],
) -> None:
    client, keys, store = setup
    for_app, record = store.create("me", app="need-job")
    status, answer = check(client, for_app)
    assert (status, answer["x-fleet-user"], answer["x-fleet-app"]) == (200, "me", "need-job")
    assert "x-fleet-app" not in check(client, keys["me"])[1]  # a key without one sends none
    rotated = store.rotate(record.id)
    assert rotated is not None and rotated[1].app == "need-job"
    assert check(client, rotated[0])[1]["x-fleet-app"] == "need-job"
    with pytest.raises(ValueError, match="not an app name"):
        store.create("me", app="Need Job")


def test_a_key_store_from_before_apps_keeps_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    first = KeyStore(path)
    old_key, old = first.create("me", label="old")
    first.close()
    raw = sqlite3.connect(path)
    # the table as it was before keys named apps: the same columns less `app`
    raw.executescript(
        "CREATE TABLE old AS SELECT id, hash, user, models, label, created, expires, revoked FROM keys;"
        " DROP TABLE keys; ALTER TABLE old RENAME TO keys;"
    )
    assert "app" not in {row[1] for row in raw.execute("PRAGMA table_info(keys)")}
    raw.close()
    store = KeyStore(path)
    try:
        found = store.check(old_key)
        assert found is not None and (found.id, found.label, found.app) == (old.id, "old", None)
        _, new = store.create("me", app="need-job")
        assert store.get(new.id) == new
    finally:
        store.close()
