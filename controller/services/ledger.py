"""The usage ledger: tokens per request, user, key and model, from Envoy's usage log.

Envoy writes one JSON line per inference request (see
``controller.render.envoy.usage_log_config``) with the backend's own usage
numbers. The ledger reads that file from a saved offset; each batch of lines
and the new offset are committed in one SQLite transaction, and a request id
is recorded at most once. So a gatekeeper restart loses nothing (Envoy kept
writing), and two readers (the gatekeeper and `controller usage`) never
count a request twice. A rotated or truncated log is read from its start.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    request_id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    day TEXT NOT NULL,           -- UTC date, for daily quotas
    user TEXT NOT NULL,
    key_id TEXT,
    model TEXT NOT NULL,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_user_day ON usage (user, day);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
CREATE TABLE IF NOT EXISTS source (
    path TEXT PRIMARY KEY,
    inode INTEGER NOT NULL,
    offset INTEGER NOT NULL
);
"""
# Read at most this much per batch, so one transaction stays short.
BATCH_BYTES = 4 * 1024 * 1024
GROUPS = {"user": "user", "model": "model", "key": "key_id", "day": "day"}


@dataclass(frozen=True)
class Entry:
    request_id: str
    ts: float
    user: str
    key_id: str | None
    model: str
    status: int
    prompt_tokens: int
    completion_tokens: int


@functools.lru_cache(maxsize=4)
def _day_of(days_since_epoch: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(days_since_epoch * 86400))


def utc_day(ts: float) -> str:
    return _day_of(int(ts // 86400))


class Ledger:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def ingest(self, log: Path, on_entry: Callable[[Entry], None] | None = None) -> int:
        """Record the log's new complete lines; return how many requests were new."""
        added = 0
        while True:
            batch = self._ingest_batch(log, on_entry)
            added += batch[0]
            if not batch[1]:
                return added

    def _ingest_batch(self, log: Path, on_entry: Callable[[Entry], None] | None) -> tuple[int, bool]:
        try:
            handle = log.open("rb")
        except FileNotFoundError:
            return 0, False
        with handle, self._lock:
            stat = os.fstat(handle.fileno())
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT inode, offset FROM source WHERE path = ?", (str(log),)).fetchone()
                offset = row[1] if row and row[0] == stat.st_ino and row[1] <= stat.st_size else 0
                handle.seek(offset)
                data = handle.read(BATCH_BYTES)
                end = data.rfind(b"\n")
                if end < 0:
                    self._db.execute("COMMIT")
                    return 0, False
                entries = [e for e in (_parse(line) for line in data[: end + 1].splitlines()) if e is not None]
                new = self._unseen(entries)
                self._db.executemany(
                    "INSERT INTO usage VALUES (?,?,?,?,?,?,?,?,?)",
                    [
                        (
                            e.request_id,
                            e.ts,
                            utc_day(e.ts),
                            e.user,
                            e.key_id,
                            e.model,
                            e.status,
                            e.prompt_tokens,
                            e.completion_tokens,
                        )
                        for e in new
                    ],
                )
                added = len(new)
                if on_entry is not None:
                    for e in new:
                        on_entry(e)
                self._db.execute(
                    "INSERT INTO source (path, inode, offset) VALUES (?,?,?) "
                    "ON CONFLICT(path) DO UPDATE SET inode = excluded.inode, offset = excluded.offset",
                    (str(log), stat.st_ino, offset + end + 1),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return added, len(data) == BATCH_BYTES

    def _unseen(self, entries: list[Entry]) -> list[Entry]:
        """``entries`` less those already recorded (a log read again after a crash) or repeated in the batch."""
        seen: set[str] = set()
        ids = [e.request_id for e in entries]
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            seen.update(
                row[0] for row in self._db.execute(f"SELECT request_id FROM usage WHERE request_id IN ({marks})", chunk)
            )
        out = []
        for e in entries:
            if e.request_id not in seen:
                seen.add(e.request_id)
                out.append(e)
        return out

    def tokens_on(self, user: str, day: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM usage WHERE user = ? AND day = ?",
                (user, day),
            ).fetchone()
        return int(row[0])

    def summary(self, since: float, by: list[str]) -> list[dict[str, Any]]:
        columns = [GROUPS[b] for b in by]
        select = ", ".join([*columns, "COUNT(*)", "SUM(prompt_tokens)", "SUM(completion_tokens)"])
        group = f"GROUP BY {', '.join(columns)} ORDER BY {', '.join(columns)}" if columns else ""
        with self._lock:
            rows = self._db.execute(f"SELECT {select} FROM usage WHERE ts >= ? {group}", (since,)).fetchall()
        out = []
        for row in rows:
            item = {name: row[i] for i, name in enumerate(by)}
            requests, prompt, completion = row[len(by) :]
            if requests == 0:
                continue
            item.update(
                requests=requests,
                prompt_tokens=prompt or 0,
                completion_tokens=completion or 0,
                total_tokens=(prompt or 0) + (completion or 0),
            )
            out.append(item)
        return out


def _parse(line: bytes) -> Entry | None:
    try:
        raw = json.loads(line)
        if not raw.get("request_id") or not raw.get("model") or not raw.get("user"):
            return None
        return Entry(
            request_id=str(raw["request_id"]),
            ts=float(raw["time"]),
            user=str(raw["user"]),
            key_id=str(raw["key_id"]) if raw.get("key_id") else None,
            model=str(raw["model"]),
            status=int(raw.get("status") or 0),
            prompt_tokens=int(raw.get("prompt_tokens") or 0),
            completion_tokens=int(raw.get("completion_tokens") or 0),
        )
    except (ValueError, TypeError, AttributeError):
        return None  # a torn or foreign line is skipped, never fatal
