"""The usage ledger: tokens per request, user, key and model, from Envoy's usage log.

Envoy writes one JSON line per inference request (see
``controller.render.envoy.usage_log_config``) with the backend's own usage
numbers. The ledger reads that file from a saved offset; each batch of lines
and the new offset are committed in one SQLite transaction, and a request
(its start time and Envoy's id for it) is recorded at most once. So a
gatekeeper restart loses nothing (Envoy kept writing), and two readers (the
gatekeeper and `controller usage`) never count a request twice. A rotated or
truncated log is read from its start. SQLite itself keeps the totals per
user, day and model that quotas and counters read.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

# One row per request, clustered by start time: the key grows with time, so recording a batch touches a
# few pages at the end of the table however large the ledger is (keyed by the random request id alone, a
# ledger of a million requests cost three times as much per line, in commits of up to 12 ms), and reading
# "since" a time is a range of the key. A line read twice has the same time and id, and is ignored.
USAGE = """
CREATE TABLE usage (
    request_id TEXT NOT NULL,
    ts REAL NOT NULL,
    day TEXT NOT NULL,           -- UTC date, for daily quotas
    user TEXT NOT NULL,
    key_id TEXT,
    model TEXT NOT NULL,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    estimated INTEGER NOT NULL DEFAULT 0,  -- 1: the backend's numbers never came (see metered)
    lease TEXT,                  -- the quota lease it was admitted under, and the bound it spent from it
    reserved INTEGER,
    app TEXT,                    -- the app the request's key names (controller keys create --app), or NULL
    PRIMARY KEY (ts, request_id)
) WITHOUT ROWID
"""
# Token leases of users with a daily quota. Envoy's Lua filter books tokens for a user's requests in leases
# (POST /auth/reserve): a lease is booked whole when it is issued, each request spends its bound (the most it
# can cost) from it inside Envoy, and the next ask reports what the old lease admitted (`admitted` requests,
# `spent` of its tokens). Each request is tagged with its lease in the usage log; recording it (a trigger, so a
# line read twice counts once) moves its bound from the lease's booking to the real usage, and a lease whose
# admitted requests are all recorded is dropped. So a user's recorded tokens plus what their leases still hold
# never under-count what their requests in flight can cost: concurrent requests never pass the quota.
LEASES = """
CREATE TABLE IF NOT EXISTS leases (
    lease_id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    booked INTEGER NOT NULL,     -- tokens held: the whole lease, or once reported what it admitted
    admitted INTEGER,            -- requests it let through, once reported (NULL: not yet)
    seen INTEGER NOT NULL DEFAULT 0,
    seen_tokens INTEGER NOT NULL DEFAULT 0,  -- the bounds of its requests recorded so far
    issued REAL NOT NULL
) WITHOUT ROWID
"""
LEASES_BY_USER = "CREATE INDEX IF NOT EXISTS leases_user ON leases (user)"
LEASE_RECORDED = """
CREATE TRIGGER IF NOT EXISTS usage_lease AFTER INSERT ON usage WHEN new.lease IS NOT NULL BEGIN
    UPDATE leases SET seen = seen + 1, seen_tokens = seen_tokens + new.reserved WHERE lease_id = new.lease;
    DELETE FROM leases WHERE lease_id = new.lease AND admitted IS NOT NULL AND seen >= admitted;
END
"""
# A user's tokens on a UTC day, and what their leases still hold (a lease never holds less than nothing).
SPENT = "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM daily WHERE user = ? AND day = ?"
HELD = "SELECT COALESCE(SUM(MAX(booked - seen_tokens, 0)), 0) FROM leases WHERE user = ?"
# A lease is a twentieth of the user's daily quota (or the request's bound, if larger): few asks per user, and
# what an idle Envoy worker thread's unreported lease holds back is small.
LEASE_FRACTION = 20
# A lease whose requests never all reached the usage log (Envoy killed mid-request, or never reported) is dropped
# after this long; until then it only holds back its own user.
LEASE_MAX_AGE_S = 3600.0
SOURCE = """
CREATE TABLE IF NOT EXISTS source (
    path TEXT PRIMARY KEY,
    inode INTEGER NOT NULL,
    offset INTEGER NOT NULL
)
"""
# Totals per user, UTC day and model, kept by SQLite itself as rows are recorded (a row ignored as a
# duplicate fires no trigger): the daily quota and the token counters read a handful of rows, not a day's
# requests.
DAILY = """
CREATE TABLE daily (
    user TEXT NOT NULL,
    day TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (user, day, model)
) WITHOUT ROWID
"""
FILL_DAILY = """
INSERT INTO daily
    SELECT user, day, model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM usage GROUP BY user, day, model
"""
TRIGGER = """
CREATE TRIGGER IF NOT EXISTS usage_daily AFTER INSERT ON usage BEGIN
    INSERT INTO daily VALUES (new.user, new.day, new.model, 1, new.prompt_tokens, new.completion_tokens)
    ON CONFLICT DO UPDATE SET
        requests = requests + 1,
        prompt_tokens = prompt_tokens + excluded.prompt_tokens,
        completion_tokens = completion_tokens + excluded.completion_tokens;
END
"""
COLUMNS = "request_id, ts, day, user, key_id, model, status, prompt_tokens, completion_tokens, estimated, lease, reserved, app"
# Read at most this much per transaction (about 1,300 requests), so reading it and committing it are short.
BATCH_BYTES = 256 * 1024
# More than this waiting (about 20,000 requests): a paced reader has fallen behind, and catches up unpaced.
BEHIND_BYTES = 4 * 1024 * 1024
# Lines parsed and recorded between two pauses: about a quarter of a millisecond of CPU, so a reader that
# paces itself (the gatekeeper) never holds a core long enough to delay the requests it shares cores with.
SLICE_LINES = 64
RECENT_LINES = 50  # the lines of each batch handed to `Ledger.ended` (the console keeps its last 50 requests)
GROUPS = {"user": "user", "model": "model", "key": "key_id", "app": "app", "day": "day"}
Row = tuple[str, float, str, str, str | None, str, int, int, int, int, str | None, int | None, str | None]


class Lease(NamedTuple):
    """A lease of a user's daily quota: its id, the tokens it holds, and what is left of the quota beside it."""

    id: str
    size: int
    left: int


@dataclass(frozen=True)
class Total:
    """Requests and tokens of one user and model, since the ledger began."""

    user: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


@functools.lru_cache(maxsize=4)
def _day_of(days_since_epoch: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(days_since_epoch * 86400))


def utc_day(ts: float) -> str:
    return _day_of(int(ts // 86400))


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    # No fsync per commit: a commit lost to a power cut takes its saved offset with it (same transaction),
    # so those lines are read again from Envoy's log; the database itself stays consistent in WAL mode.
    db.execute("PRAGMA synchronous=NORMAL")
    # Checkpoint the WAL into the database every ~400 KiB rather than SQLite's 4 MiB: the same work, in
    # pieces short enough not to hold a core the request path is waiting for.
    db.execute("PRAGMA wal_autocheckpoint=100")
    return db


class Ledger:
    """Writes go through one connection, reads through another (WAL: readers never wait for a writer)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self._db = _connect(path)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._schema()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._lock = threading.Lock()
        self._reader = _connect(path)
        self._read_lock = threading.Lock()
        # Told the last RECENT_LINES usage lines of each batch read, once recorded: the console's recently
        # ended requests come from here (controller/console/live.py), so no other reader parses every line.
        self.ended: Callable[[list[dict[str, Any]]], None] | None = None

    def close(self) -> None:
        self._db.close()
        self._reader.close()

    def _schema(self) -> None:
        """Create the tables, or bring a ledger written by an earlier version up to date (its rows kept)."""

        def sql_of(name: str) -> str | None:
            row = self._db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()
            return None if row is None else str(row[0])

        usage = sql_of("usage")
        if usage is not None and "WITHOUT ROWID" not in usage.upper():  # keyed by request id alone
            self._db.execute("ALTER TABLE usage RENAME TO usage_v1")  # its indexes and trigger go with it
            self._db.execute(USAGE)
            v1 = COLUMNS.removesuffix(", estimated, lease, reserved, app")  # v1 had only the backends' own numbers
            self._db.execute(f"INSERT OR IGNORE INTO usage ({v1}) SELECT {v1} FROM usage_v1")
            self._db.execute("DROP TABLE usage_v1")
        elif usage is None:
            self._db.execute(USAGE)
        else:
            columns = {str(row[1]) for row in self._db.execute("PRAGMA table_info(usage)")}
            if "estimated" not in columns:  # written before estimates were recorded: every row was the backend's
                self._db.execute("ALTER TABLE usage ADD COLUMN estimated INTEGER NOT NULL DEFAULT 0")
                self._db.execute("ALTER TABLE usage ADD COLUMN lease TEXT")
                self._db.execute("ALTER TABLE usage ADD COLUMN reserved INTEGER")
            if "app" not in columns:  # written before keys named apps: those requests had none
                self._db.execute("ALTER TABLE usage ADD COLUMN app TEXT")
        self._db.execute(SOURCE)
        self._db.execute(LEASES)
        self._db.execute(LEASES_BY_USER)
        self._db.execute(LEASE_RECORDED)
        if sql_of("daily") is None:
            self._db.execute(DAILY)
            self._db.execute(FILL_DAILY)
        self._db.execute(TRIGGER)

    def ingest(self, log: Path, pause: Callable[[], object] | None = None) -> int:
        """Record the log's new complete lines; return how many requests were new.

        ``pause`` is called between slices of SLICE_LINES lines, before each commit and between batches, so
        a caller that shares cores with the request path can spread the work out (readers are not held up
        meanwhile: WAL); but not while more than BEHIND_BYTES are waiting, so a paced reader that fell
        behind catches up.
        """
        added = 0
        while True:
            new, more, behind = self._ingest_batch(log, pause)
            added += new
            if not more:
                return added
            if pause is not None and not behind:
                pause()

    def _ingest_batch(self, log: Path, pause: Callable[[], object] | None) -> tuple[int, bool, bool]:
        """One transaction: (requests added, whether a whole batch was read, whether the reader is behind)."""
        try:
            handle = log.open("rb")
        except FileNotFoundError:
            return 0, False, False
        with handle, self._lock:
            stat = os.fstat(handle.fileno())
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT inode, offset FROM source WHERE path = ?", (str(log),)).fetchone()
                if row is None or row[0] != stat.st_ino:  # renamed since it was read (rotated): found by its inode
                    row = self._db.execute(
                        "SELECT inode, offset FROM source WHERE inode = ? ORDER BY offset DESC", (stat.st_ino,)
                    ).fetchone()
                offset = row[1] if row and row[0] == stat.st_ino and row[1] <= stat.st_size else 0
                behind = stat.st_size - offset > BEHIND_BYTES
                rest = pause if pause is not None and not behind else None
                handle.seek(offset)
                data = handle.read(BATCH_BYTES)
                end = data.rfind(b"\n")
                if end < 0:
                    self._db.execute("COMMIT")
                    return 0, False, behind
                lines = data[: end + 1].splitlines()
                added = 0
                last: list[Any] = []  # the batch's last lines, for whoever watches requests end
                for start in range(0, len(lines), SLICE_LINES):
                    if start and rest is not None:
                        rest()
                    raws = _parse(lines[start : start + SLICE_LINES])
                    last = (last + raws)[-RECENT_LINES:]
                    rows = _rows(raws)
                    # A request already recorded (the log read again) or repeated is ignored, and fires no trigger.
                    added += self._db.executemany(
                        f"INSERT OR IGNORE INTO usage ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows
                    ).rowcount
                self._db.execute(
                    "INSERT INTO source (path, inode, offset) VALUES (?,?,?) "
                    "ON CONFLICT(path) DO UPDATE SET inode = excluded.inode, offset = excluded.offset",
                    (str(log), stat.st_ino, offset + end + 1),
                )
                if rest is not None:
                    rest()  # the commit (now and then with a WAL checkpoint) on its own
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if self.ended is not None and last:
            self.ended(last)
        return added, len(data) == BATCH_BYTES, behind

    def read_to(self, log: Path) -> int | None:
        """How far the file now at ``log`` has been read (its saved offset, found by its inode), None if not yet."""
        try:
            inode = log.stat().st_ino
        except FileNotFoundError:
            return None
        with self._lock:
            row = self._db.execute("SELECT MAX(offset) FROM source WHERE inode = ?", (inode,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def forget(self, log: Path) -> None:
        """Drop the saved offsets of the file now at ``log``, before it is deleted: a later file that gets its
        inode number must be read from its start."""
        inode = log.stat().st_ino
        with self._lock:
            self._db.execute("DELETE FROM source WHERE inode = ?", (inode,))

    def lease(
        self,
        user: str,
        tokens: int,
        limit: int,
        now: float,
        report: tuple[str, int, int] | None = None,
        single: bool = False,
    ) -> Lease | int:
        """A lease of ``user``'s daily quota ``limit`` for a request that may cost ``tokens`` (its id, how many
        tokens it holds, at least ``tokens``, and how many are left beside it), or, when even ``tokens`` do not
        fit, how many do.

        ``report`` closes the asker's previous lease: (its id, the requests it admitted, the tokens they may
        cost); from then on it holds only those, until they are recorded. ``single``: a lease of exactly
        ``tokens`` for one request, closed at once (asked while another renewal is under way). One
        transaction reads what is recorded and held, and books.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM leases WHERE issued < ?", (now - LEASE_MAX_AGE_S,))
                if report is not None:
                    lease_id, admitted, spent = report
                    self._db.execute(
                        "UPDATE leases SET booked = ?, admitted = ? WHERE lease_id = ? AND user = ?",
                        (spent, admitted, lease_id, user),
                    )
                    self._db.execute(
                        "DELETE FROM leases WHERE lease_id = ? AND admitted IS NOT NULL AND seen >= admitted",
                        (lease_id,),
                    )
                (spent_today,) = self._db.execute(SPENT, (user, utc_day(now))).fetchone()
                (held,) = self._db.execute(HELD, (user,)).fetchone()
                room = limit - int(spent_today) - int(held)
                if tokens > room:
                    self._db.execute("COMMIT")
                    return max(room, 0)
                size = tokens if single else min(room, max(tokens, limit // LEASE_FRACTION))
                lease_id = secrets.token_hex(8)
                self._db.execute(
                    "INSERT INTO leases (lease_id, user, booked, admitted, issued) VALUES (?, ?, ?, ?, ?)",
                    (lease_id, user, size, 1 if single else None, now),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return Lease(lease_id, size, room - size)

    def booked(self, user: str) -> int:
        """Tokens ``user``'s leases still hold (requests in flight, and what open leases have not spent)."""
        with self._read_lock:
            (held,) = self._reader.execute(HELD, (user,)).fetchone()
        return int(held)

    def tokens_on(self, user: str, day: str) -> int:
        with self._read_lock:
            row = self._reader.execute(SPENT, (user, day)).fetchone()
        return int(row[0])

    def totals(self) -> list[Total]:
        """Requests and tokens per user and model since the ledger began (for counters that survive restarts)."""
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT user, model, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens) FROM daily "
                "GROUP BY user, model ORDER BY user, model"
            ).fetchall()
        return [Total(*row) for row in rows]

    def summary(self, since: float, by: list[str]) -> list[dict[str, Any]]:
        columns = [GROUPS[b] for b in by]
        estimated = "SUM(estimated), SUM(CASE WHEN estimated THEN prompt_tokens + completion_tokens ELSE 0 END)"
        select = ", ".join([*columns, "COUNT(*)", "SUM(prompt_tokens)", "SUM(completion_tokens)", estimated])
        group = f"GROUP BY {', '.join(columns)} ORDER BY {', '.join(columns)}" if columns else ""
        with self._read_lock:
            rows = self._reader.execute(f"SELECT {select} FROM usage WHERE ts >= ? {group}", (since,)).fetchall()
        out = []
        for row in rows:
            item = {name: row[i] for i, name in enumerate(by)}
            requests, prompt, completion, estimated_requests, estimated_tokens = row[len(by) :]
            if requests == 0:
                continue
            item.update(
                requests=requests,
                prompt_tokens=prompt or 0,
                completion_tokens=completion or 0,
                total_tokens=(prompt or 0) + (completion or 0),
                estimated_requests=estimated_requests or 0,
                estimated_tokens=estimated_tokens or 0,
            )
            out.append(item)
        return out


def _parse(lines: list[bytes]) -> list[Any]:
    """The JSON objects of complete usage-log lines; a torn line is skipped, never fatal."""
    try:  # the common case, one parser call for the slice: Envoy writes one JSON object per line
        raws: list[Any] = json.loads(b"[" + b",".join(lines) + b"]")
        return raws
    except ValueError:
        raws = []
        for line in lines:
            try:
                raws.append(json.loads(line))
            except ValueError:
                continue
        return raws


def _rows(raws: list[Any]) -> list[Row]:
    """Ledger rows from the parsed usage-log lines (`_parse`); a foreign line is skipped, never fatal."""
    rows = []
    for raw in raws:
        try:
            rid, user, model = raw.get("request_id"), raw.get("user"), raw.get("model")
            if not rid or not user or not model:
                continue
            ts = float(raw["time"])
            key_id, app = raw.get("key_id"), raw.get("app")
            prompt, completion, estimated = metered(raw)
            lease, reserved = raw.get("lease"), raw.get("reserved")
            lease_of = str(lease) if lease not in (None, "", "-") and reserved not in (None, "", "-") else None
            rows.append(
                (
                    str(rid),
                    ts,
                    utc_day(ts),
                    str(user),
                    str(key_id) if key_id else None,
                    str(model),
                    int(raw.get("status") or 0),
                    prompt,
                    completion,
                    int(estimated),
                    lease_of,
                    int(reserved) if lease_of is not None else None,
                    str(app) if app not in (None, "", "-") else None,
                )
            )
        except (KeyError, ValueError, TypeError, AttributeError):
            continue
    return rows


def _count(line: dict[str, Any], field: str) -> int | None:
    """A token count of a usage-log line; None where Envoy wrote none (absent, empty, or its "-")."""
    value = line.get(field)
    return None if value in (None, "", "-") else int(value)


def metered(line: dict[str, Any]) -> tuple[int, int, bool]:
    """(prompt tokens, completion tokens, estimated) for one usage-log line.

    The backend's own numbers when they came. When they never did (the client went away, the backend
    was killed mid-answer, or it sends none) but the request reached a backend, an estimate that does
    not under-count, marked as such:

    - prompt: the request body's size in bytes. Every prompt token costs at least one byte of the JSON
      it came in, and the JSON around each message (``{"role":"user","content":""}``, 28 bytes) is
      longer than what a chat template adds per message;
    - completion, for a stream: what the gateway saw pass (``seen_tokens``): the bytes of the generated
      text, since every token adds at least one (several tokens may come in one event), or the number of
      events where that is more, and never more than the request could make (its completion cap).
      An upper bound: for English text about four times the tokens;
    - completion, for a whole answer that never came: the most the request could make (its largest
      token limit for each choice, at most the model's context), since none of it was seen.

    A Messages answer's prompt is its input_tokens with the cached ones it counts apart (cache_read_input_tokens,
    cache_creation_input_tokens). A stream whose backend counted its prompt at the start (an Anthropic stream's message_start) but whose end
    never came keeps that prompt count, with its completion estimated as above. A rerank answer that counts
    only a total (vLLM's) is that many prompt tokens.

    A request no backend received, or one a backend refused with an error, cost nothing.
    """
    prompt, completion = _count(line, "prompt_tokens"), _count(line, "completion_tokens")
    stream = line.get("stream") == "1"
    if prompt is not None:  # a Messages answer counts its cached prompt tokens apart
        prompt += sum(_count(line, f) or 0 for f in ("cache_read_tokens", "cache_creation_tokens"))
        if completion is not None or not stream:
            return prompt, completion or 0, False
    total = _count(line, "total_tokens")
    if prompt is None and total is not None:  # a rerank answer that counts only its input
        return total, completion or 0, False
    if line.get("upstream") in (None, "", "-"):  # never sent (or a line written before estimates existed)
        return 0, 0, False
    status = int(line.get("status") or 0)
    cut = status == 0 or "DC" in str(line.get("flags") or "").split(",")  # the client went away
    seen = int(line.get("seen_tokens") or 0)
    if not cut and status >= 400 and seen == 0:  # the backend refused it
        return 0, 0, False
    bound = int(line.get("bytes_in") or 0)
    cap = int(line.get("completion_cap") or 0)  # the most the request could make, whatever its text's bytes say
    if stream:
        if prompt is not None:  # the backend counted the prompt at the start, the end never came
            bound = prompt
        return bound, min(seen, cap) if cap else seen, True
    if status < 300 or cut:
        return bound, cap, True
    return 0, 0, False
