"""The usage ledger: each request counted once, whatever is read twice; torn lines wait for their end;
totals per user, day and model kept by SQLite, also for a ledger written before they existed."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from controller.gateway import ledger as ledger_module
from controller.gateway.ledger import SLICE_LINES, Ledger, Total, utc_day
from controller.gateway.rotation import Rotation


def line(request_id: str, user: str = "me", prompt: int = 3, completion: int = 5, ts: float = 1795600000.0) -> str:
    entry = {
        "time": f"{ts:.3f}",
        "request_id": request_id,
        "user": user,
        "key_id": "0123456789ab",
        "model": "tiny-chat",
        "status": 200,
        "prompt_tokens": str(prompt),
        "completion_tokens": str(completion),
        "ms": 4,
    }
    return json.dumps(entry) + "\n"


def test_each_request_counts_once_even_when_the_log_is_read_again(tmp_path: Path) -> None:
    log = tmp_path / "usage.log"
    log.write_text(line("a") + line("b") + line("a"))  # "a" twice: a retried write
    ledger = Ledger(tmp_path / "usage.db")
    assert ledger.ingest(log) == 2
    day = utc_day(1795600000.0)
    assert ledger.tokens_on("me", day) == 16
    assert ledger.totals() == [Total("me", "tiny-chat", 2, 6, 10)]
    # The saved offset lost (as after a crash between the insert and its commit elsewhere): read from 0 again.
    ledger._db.execute("DELETE FROM source")
    with log.open("a") as out:
        out.write(line("c", completion=7))
    assert ledger.ingest(log) == 1
    assert ledger.tokens_on("me", day) == 26
    assert ledger.totals() == [Total("me", "tiny-chat", 3, 9, 17)]
    assert [row["requests"] for row in ledger.summary(0, ["user"])] == [3]
    ledger.close()


def test_a_torn_line_waits_for_its_end(tmp_path: Path) -> None:
    log = tmp_path / "usage.log"
    whole = line("x")
    log.write_text(whole[:20])
    ledger = Ledger(tmp_path / "usage.db")
    assert ledger.ingest(log) == 0
    log.write_text(whole + "not json\n")  # the rest arrives; a foreign line is skipped, never fatal
    assert ledger.ingest(log) == 1
    assert ledger.ingest(log) == 0
    ledger.close()


def test_utc_day_turns_at_midnight_utc() -> None:
    midnight = 1795651200.0  # 2026-11-26T00:00:00Z
    assert utc_day(midnight - 0.001) == "2026-11-25"
    assert utc_day(midnight) == "2026-11-26"


def test_a_long_log_is_recorded_in_slices_with_pauses_between(tmp_path: Path) -> None:
    log = tmp_path / "usage.log"
    count = 3 * SLICE_LINES + 5
    days = [1795600000.0, 1795600000.0 + 86400]  # two UTC days, two users
    log.write_text("".join(line(f"r{i}", user=f"u{i % 2}", ts=days[i % 2]) for i in range(count)))
    ledger = Ledger(tmp_path / "usage.db")
    pauses: list[int] = []
    assert ledger.ingest(log, pause=lambda: pauses.append(1)) == count
    assert len(pauses) == 4  # between the four slices, and before the commit
    u0 = len(range(0, count, 2))
    assert ledger.tokens_on("u0", utc_day(days[0])) == 8 * u0
    assert ledger.tokens_on("u0", utc_day(days[1])) == 0
    assert ledger.tokens_on("u1", utc_day(days[1])) == 8 * (count - u0)
    assert ledger.totals() == [
        Total("u0", "tiny-chat", u0, 3 * u0, 5 * u0),
        Total("u1", "tiny-chat", count - u0, 3 * (count - u0), 5 * (count - u0)),
    ]
    ledger.close()


def test_a_reader_that_fell_behind_catches_up_without_pauses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "usage.log"
    lines = [line(f"b{i:04d}") for i in range(4 * SLICE_LINES)]  # all of one length
    log.write_text("".join(lines))
    # Read in batches of two slices; more than three slices waiting counts as behind.
    monkeypatch.setattr(ledger_module, "BATCH_BYTES", len("".join(lines[: 2 * SLICE_LINES])))
    monkeypatch.setattr(ledger_module, "BEHIND_BYTES", len("".join(lines[: 3 * SLICE_LINES])))
    ledger = Ledger(tmp_path / "usage.db")
    pauses: list[int] = []
    assert ledger.ingest(log, pause=lambda: pauses.append(1)) == len(lines)
    # The first batch (four slices waiting: behind) unpaced; the second (two waiting) paced: between its
    # slices, before its commit, and after it (it was a whole batch, so there may be more).
    assert len(pauses) == 3
    ledger.close()


def test_a_ledger_from_before_the_totals_gets_them_from_its_rows(tmp_path: Path) -> None:
    """An older usage.db (per-request rows, no totals table): opened, it gains the totals from those rows."""
    path = tmp_path / "usage.db"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE usage (request_id TEXT PRIMARY KEY, ts REAL NOT NULL, day TEXT NOT NULL, user TEXT NOT NULL,
            key_id TEXT, model TEXT NOT NULL, status INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL);
        CREATE INDEX usage_user_day ON usage (user, day);
        CREATE TABLE source (path TEXT PRIMARY KEY, inode INTEGER NOT NULL, offset INTEGER NOT NULL);
        INSERT INTO usage VALUES ('old1', 1795600000.0, '2026-11-25', 'me', NULL, 'tiny-chat', 200, 10, 20);
        INSERT INTO usage VALUES ('old2', 1795600001.0, '2026-11-25', 'me', NULL, 'tiny-chat', 200, 1, 2);
        """
    )
    old.close()
    ledger = Ledger(path)
    assert ledger.tokens_on("me", "2026-11-25") == 33
    log = tmp_path / "usage.log"
    log.write_text(line("old1") + line("new1"))  # old1 again: ignored, and not added to the totals
    assert ledger.ingest(log) == 1
    assert ledger.totals() == [Total("me", "tiny-chat", 3, 14, 27)]
    assert ledger.summary(0, ["user", "day"]) == [
        {
            "user": "me",
            "day": "2026-11-25",
            "requests": 3,
            "prompt_tokens": 14,
            "completion_tokens": 27,
            "total_tokens": 41,
            "estimated_requests": 0,
            "estimated_tokens": 0,
        }
    ]
    ledger.close()
    assert Ledger(path).totals() == [Total("me", "tiny-chat", 3, 14, 27)]  # opened again: not filled twice


def cut_line(request_id: str, **fields: object) -> str:
    """A usage line without the backend's numbers, as Envoy writes it for a request that ended early."""
    entry: dict[str, object] = {
        "time": "1795600000.000",
        "request_id": request_id,
        "user": "me",
        "key_id": None,
        "model": "tiny-chat",
        "status": 200,
        "prompt_tokens": None,
        "completion_tokens": None,
        "ms": 40,
        "upstream": "127.0.0.1:9000",
        "flags": "-",
        "stream": None,
        "seen_tokens": None,
        "bytes_in": 120,
        "completion_cap": "64",
    }
    entry.update(fields)
    return json.dumps(entry) + "\n"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # A stream cut by the client: the prompt bound and what passed.
        ({"stream": "1", "seen_tokens": "7", "flags": "DC"}, (120, 7, True)),
        # A stream whose backend sent no usage, or was killed mid-stream.
        ({"stream": "1", "seen_tokens": "3", "flags": "UPE"}, (120, 3, True)),
        # A whole answer the client did not wait for: the most it could make.
        ({"status": 0, "flags": "DC"}, (120, 64, True)),
        # A whole answer that came without usage.
        ({}, (120, 64, True)),
        # Never reached a backend (no healthy upstream), or refused by it: nothing was generated.
        ({"upstream": None, "status": 503, "flags": "UH"}, (0, 0, False)),
        ({"status": 400}, (0, 0, False)),
        ({"stream": "1", "status": 400}, (0, 0, False)),
        # Never more than the request could make: its text's bytes may say more than its token limit.
        ({"stream": "1", "seen_tokens": "400", "completion_cap": "100", "flags": "DC"}, (120, 100, True)),
        # The backend's own numbers always win.
        ({"prompt_tokens": "9", "completion_tokens": "2", "stream": "1", "seen_tokens": "40"}, (9, 2, False)),
        # A Messages answer counts its cached prompt tokens apart: they are prompt tokens too.
        ({"prompt_tokens": "1", "completion_tokens": "2", "cache_read_tokens": "21"}, (22, 2, False)),
        ({"prompt_tokens": "1", "completion_tokens": "2", "cache_creation_tokens": "5"}, (6, 2, False)),
        # A Messages stream cut after message_start: its prompt as counted, its completion from what passed.
        ({"prompt_tokens": "22", "stream": "1", "seen_tokens": "5", "flags": "DC"}, (22, 5, True)),
        # A rerank answer of vLLM counts only a total: its prompt.
        ({"total_tokens": "30"}, (30, 0, False)),
        # An embedding's answer has no completion tokens: not an estimate.
        ({"prompt_tokens": "8", "total_tokens": "8"}, (8, 0, False)),
    ],
)
def test_a_request_without_the_backends_numbers_is_estimated_not_free(
    tmp_path: Path, fields: dict[str, object], expected: tuple[int, int, bool]
) -> None:
    assert ledger_module.metered(json.loads(cut_line("r", **fields))) == expected
    log = tmp_path / "usage.log"
    log.write_text(cut_line("r", **fields))
    ledger = Ledger(tmp_path / "usage.db")
    assert ledger.ingest(log) == 1
    (row,) = ledger.summary(0, ["user"])
    prompt, completion, estimated = expected
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    assert (row["estimated_requests"], row["estimated_tokens"]) == (int(estimated), (prompt + completion) * estimated)
    ledger.close()


def test_leases_keep_requests_in_flight_within_the_quota(tmp_path: Path) -> None:
    """What is recorded plus what leases hold never passes the limit; a lease holds its requests' bounds until
    they are recorded, and once reported, no more than what it admitted."""
    ledger = Ledger(tmp_path / "usage.db")
    now = 1795600000.0

    def lease(tokens: int, report: tuple[str, int, int] | None = None) -> tuple[str, int]:
        granted = ledger.lease("me", tokens, 1000, now, report)
        assert isinstance(granted, tuple), granted
        assert granted.left == 1000 - ledger.booked("me") - ledger.tokens_on("me", utc_day(now))
        return granted.id, granted.size

    a, size = lease(60)
    assert size == 60  # a twentieth of the quota is 50; a lease holds at least the request's bound
    _, size = lease(900)
    assert size == 900 and ledger.booked("me") == 960
    assert ledger.lease("me", 50, 1000, now) == 40  # refused: only 40 fit beside the two leases
    assert isinstance(ledger.lease("you", 50, 1000, now), tuple)  # another user's quota is their own
    # Lease a's thread admitted two requests of 30 on it, then asks again and reports it.
    _, size = lease(30, report=(a, 2, 60))
    assert size == 40 and ledger.booked("me") == 1000
    log = tmp_path / "usage.log"
    log.write_text("".join(leased_line(r, a, 30, prompt=3, completion=5, ts=now) for r in ("r1", "r2")))
    assert ledger.ingest(log) == 2
    assert ledger.booked("me") == 940  # lease a is done: its two requests cost 16, now recorded
    _, size = lease(44)  # 1000 - 16 - 940
    assert size == 44 and ledger.lease("me", 1, 1000, now) == 0
    ledger._db.execute("DELETE FROM source")  # the log read again: a request counts once, in the quota too
    assert ledger.ingest(log) == 0 and ledger.booked("me") == 984
    # A single request's lease (asked while a renewal is under way): exactly its bound, closed at once.
    single = ledger.lease("you", 7, 1000, now, single=True)
    assert isinstance(single, tuple) and single[1] == 7
    log.write_text(leased_line("r3", single[0], 7, prompt=1, completion=1, ts=now).replace('"me"', '"you"'))
    ledger.ingest(log)
    assert ledger._db.execute("SELECT COUNT(*) FROM leases WHERE lease_id = ?", (single[0],)).fetchone() == (0,)
    # A lease whose requests never all show up is dropped after LEASE_MAX_AGE_S.
    later = now + ledger_module.LEASE_MAX_AGE_S + 1
    assert ledger.lease("me", 985, 1000, later) == 984  # nothing held any more; today's 16 still count
    ledger.close()


def leased_line(request_id: str, lease: str, reserved: int, prompt: int, completion: int, ts: float) -> str:
    entry = json.loads(line(request_id, prompt=prompt, completion=completion, ts=ts))
    entry.update(lease=lease, reserved=str(reserved))
    return json.dumps(entry) + "\n"


def test_a_ledger_from_before_estimates_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE usage (request_id TEXT NOT NULL, ts REAL NOT NULL, day TEXT NOT NULL, user TEXT NOT NULL, "
        "key_id TEXT, model TEXT NOT NULL, status INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, "
        "completion_tokens INTEGER NOT NULL, PRIMARY KEY (ts, request_id)) WITHOUT ROWID"
    )
    old.execute(
        "INSERT INTO usage VALUES ('a', 1795600000.0, ?, 'me', NULL, 'tiny-chat', 200, 3, 5)", (utc_day(1795600000.0),)
    )
    old.commit()
    old.close()
    ledger = Ledger(path)
    (row,) = ledger.summary(0, ["user"])
    assert (row["requests"], row["total_tokens"], row["estimated_requests"]) == (1, 8, 0)
    ledger.close()


def test_usage_is_grouped_by_the_app_its_key_names(tmp_path: Path) -> None:
    log = tmp_path / "usage.log"
    with_app = json.loads(line("b", completion=9))
    with_app["app"] = "need-job"
    unset = json.loads(line("c", completion=1))
    unset["app"] = None  # Envoy writes a missing header as null
    log.write_text(line("a") + json.dumps(with_app) + "\n" + json.dumps(unset) + "\n")
    ledger = Ledger(tmp_path / "usage.db")
    ledger.ingest(log)
    rows = {(r["user"], r["app"]): r["total_tokens"] for r in ledger.summary(0, ["user", "app"])}
    assert rows == {("me", None): 12, ("me", "need-job"): 12}
    ledger.close()


def test_a_ledger_from_before_apps_gets_the_column_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    log = tmp_path / "usage.log"
    log.write_text(line("a"))
    ledger = Ledger(path)
    ledger.ingest(log)
    ledger.close()
    raw = sqlite3.connect(path)
    raw.execute("ALTER TABLE usage DROP COLUMN app")
    raw.commit()
    raw.close()
    ledger = Ledger(path)
    entry = json.loads(line("b"))
    entry["app"] = "need-job"
    with log.open("a") as out:
        out.write(json.dumps(entry) + "\n")
    assert ledger.ingest(log) == 1
    assert {r["app"]: r["requests"] for r in ledger.summary(0, ["app"])} == {None: 1, "need-job": 1}
    ledger.close()


class FakeEnvoy:
    """Writes usage lines as Envoy does: to the file it opened, whatever that file is called now; reopening (its
    /reopen_logs) opens the path again."""

    def __init__(self, path: Path, answers: bool = True) -> None:
        self.path, self.answers, self.written = path, answers, 0
        self.file = path.open("a")

    def write(self, count: int) -> None:
        for _ in range(count):
            self.written += 1
            self.file.write(cut_line(f"r{self.written}", prompt_tokens="3", completion_tokens="2"))
        self.file.flush()

    def reopen(self) -> bool:
        if not self.answers:
            return False
        self.file.close()
        self.file = self.path.open("a")
        return True


def test_the_usage_log_is_rotated_without_losing_a_line(tmp_path: Path) -> None:
    log = tmp_path / "usage.log"
    live = tmp_path / "live.log"
    live.write_text("{}\n")
    ledger = Ledger(tmp_path / "usage.db")
    envoy = FakeEnvoy(log, answers=False)  # at first Envoy is not there to hear the ask
    now = [0.0]
    rotation = Rotation(log, live, ledger, envoy.reopen, limit=4096, settle_s=5, clock=lambda: now[0])
    one_line = len(cut_line("r1", prompt_tokens="3", completion_tokens="2"))
    envoy.write(4096 // one_line + 1)  # past the limit
    rotation.step()
    assert not (tmp_path / "usage.log.1").exists(), "rotated before its lines were in the ledger"
    ledger.ingest(log)
    rotation.step()  # every line read: renamed, Envoy asked (and not there)
    assert (tmp_path / "usage.log.1").exists() and not log.exists() and (tmp_path / "live.log.1").exists()
    envoy.write(5)  # still into the old file, under its new name
    ledger.ingest(log)
    rotation.step()  # asked again: still nobody
    envoy.answers = True
    rotation.step()  # reads the old file on, asks again: now the new file exists
    assert log.exists() and not (tmp_path / "live.log.1").exists()
    envoy.write(7)  # into the new file
    ledger.ingest(log)
    for t in (1.0, 2.0, 7.0, 8.0):  # the old file is removed once it has not grown for settle_s
        now[0] = t
        rotation.step()
    assert not (tmp_path / "usage.log.1").exists()
    assert rotation.rotations == 1
    envoy.write(3)
    ledger.ingest(log)
    (row,) = ledger.summary(0, ["user"])
    assert row["requests"] == envoy.written and row["prompt_tokens"] == 3 * envoy.written
    assert len(log.read_text().splitlines()) == 10  # only what came after the rotation
    envoy.file.close()
    ledger.close()


def test_a_rotated_file_deleted_leaves_no_offset_for_a_new_file_with_its_inode(tmp_path: Path) -> None:
    """The old file's saved offsets go with it: a new usage log that gets its inode number is read from its start."""
    log = tmp_path / "usage.log"
    ledger = Ledger(tmp_path / "usage.db")
    envoy = FakeEnvoy(log)
    envoy.write(3)
    ledger.ingest(log)
    assert ledger.read_to(log) == log.stat().st_size
    ledger.forget(log)
    assert ledger.read_to(log) is None
    assert ledger.ingest(log) == 0  # read again from its start: nothing new (each request counts once)
    envoy.file.close()
    ledger.close()
