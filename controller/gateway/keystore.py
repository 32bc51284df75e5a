"""API keys: created once, stored only as hashes, checked in constant time.

A key looks like ``sk-fleet-<id>-<secret>``: the 12-hex-digit id is public
(it names the key in lists, logs and usage), the secret is 256 random bits.
Only SHA-256 of the whole key is stored. A fast hash is right here: the
secret is random and long, so there is nothing to brute-force, and the
check stays in microseconds. Lookup is by id; the hash comparison uses
``hmac.compare_digest``.

The store is one SQLite file (WAL mode, mode 0600) under the gateway's state.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

KEY_PREFIX = "sk-fleet-"
ID_LENGTH = 12
# Bound what we even look at: a real key is ~65 characters.
MAX_KEY_LENGTH = 200
# An app a key is for (`controller keys create --app need-job`): carried to Envoy with the identity, written
# in the usage log, the ledger and the console's request rows, so "whose requests are these" has an answer.
APP_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
APP_RULE = "1-64 of lower-case letters, digits, '.', '_', '-', starting with a letter or digit"

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    hash BLOB NOT NULL,
    user TEXT NOT NULL,
    models TEXT,             -- JSON list restricting the key further, or NULL
    label TEXT,
    created REAL NOT NULL,
    expires REAL,            -- unix time, or NULL for never
    revoked REAL,            -- unix time, or NULL
    app TEXT                 -- the app the key is for, or NULL
);
-- Envoy asks which keys were revoked lately (the gatekeeper's /auth/sync), about once a second.
CREATE INDEX IF NOT EXISTS keys_revoked ON keys (revoked) WHERE revoked IS NOT NULL;
"""


@dataclass(frozen=True)
class KeyRecord:
    id: str
    user: str
    models: list[str] | None
    label: str | None
    created: float
    expires: float | None
    revoked: float | None
    app: str | None = None

    def active(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return self.revoked is None and (self.expires is None or now < self.expires)

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "user": self.user,
            "models": self.models,
            "label": self.label,
            "created": self.created,
            "expires": self.expires,
            "revoked": self.revoked,
            "app": self.app,
            "active": self.active(),
        }


SELECT_KEYS = "SELECT id, hash, user, models, label, created, expires, revoked, app FROM keys"


def key_id(key: str) -> str | None:
    """The public id inside a well-formed key, or None."""
    if len(key) > MAX_KEY_LENGTH or not key.startswith(KEY_PREFIX):
        return None
    ident = key[len(KEY_PREFIX) : len(KEY_PREFIX) + ID_LENGTH]
    if len(ident) != ID_LENGTH or key[len(KEY_PREFIX) + ID_LENGTH : len(KEY_PREFIX) + ID_LENGTH + 1] != "-":
        return None
    if not all(c in "0123456789abcdef" for c in ident):
        return None
    return ident


def app_problem(app: str) -> str | None:
    """Why ``app`` cannot name an app (None: it can)."""
    if APP_PATTERN.fullmatch(app) is None:
        return f"{app!r} is not an app name: use {APP_RULE}"
    return None


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class KeyStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                columns = {str(row[1]) for row in self._db.execute("PRAGMA table_info(keys)")}
                if "app" not in columns:  # a store written before keys named apps: its keys keep working
                    self._db.execute("ALTER TABLE keys ADD COLUMN app TEXT")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self._db.close()

    def create(
        self,
        user: str,
        models: list[str] | None = None,
        expires: float | None = None,
        label: str | None = None,
        app: str | None = None,
    ) -> tuple[str, KeyRecord]:
        """A new key for ``user`` (for ``app``, if given); the key itself is returned once and never stored."""
        problem = None if app is None else app_problem(app)
        if problem is not None:
            raise ValueError(problem)
        ident = secrets.token_hex(ID_LENGTH // 2)
        key = f"{KEY_PREFIX}{ident}-{secrets.token_urlsafe(32)}"
        record = KeyRecord(ident, user, models, label, time.time(), expires, None, app)
        with self._lock:
            self._db.execute(
                "INSERT INTO keys (id, hash, user, models, label, created, expires, revoked, app) "
                "VALUES (?,?,?,?,?,?,?,NULL,?)",
                (
                    ident,
                    digest(key),
                    user,
                    json.dumps(models) if models is not None else None,
                    label,
                    record.created,
                    expires,
                    app,
                ),
            )
        return key, record

    def check(self, key: str, now: float | None = None) -> KeyRecord | None:
        """The active record for ``key``, or None. Constant-time in the secret."""
        ident = key_id(key)
        presented = digest(key)
        row = None
        if ident is not None:
            with self._lock:
                row = self._db.execute(SELECT_KEYS + " WHERE id = ?", (ident,)).fetchone()
        stored = row[1] if row is not None else b"\0" * 32
        if not hmac.compare_digest(presented, stored) or row is None:
            return None
        record = _record(row)
        return record if record.active(now) else None

    def get(self, ident: str) -> KeyRecord | None:
        with self._lock:
            row = self._db.execute(SELECT_KEYS + " WHERE id = ?", (ident,)).fetchone()
        return _record(row) if row else None

    def list(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute(SELECT_KEYS + " ORDER BY created, id").fetchall()
        return [_record(r) for r in rows]

    def revoke(self, ident: str) -> bool:
        with self._lock:
            cur = self._db.execute("UPDATE keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), ident))
        return cur.rowcount == 1

    def revoked_since(self, since: float) -> tuple[str, ...]:
        """The ids of the keys revoked at ``since`` or later (unix time)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM keys WHERE revoked IS NOT NULL AND revoked >= ? ORDER BY id", (since,)
            ).fetchall()
        return tuple(str(r[0]) for r in rows)

    def rotate(self, ident: str) -> tuple[str, KeyRecord] | None:
        """Replace a key by a new one with the same user, models and expiry; the old one is revoked."""
        old = self.get(ident)
        if old is None or old.revoked is not None:
            return None
        new = self.create(old.user, old.models, old.expires, old.label, old.app)
        self.revoke(ident)
        return new


def _record(row: tuple[object, ...]) -> KeyRecord:
    ident, _, user, models, label, created, expires, revoked, app = row
    return KeyRecord(
        id=str(ident),
        user=str(user),
        models=json.loads(str(models)) if models is not None else None,
        label=str(label) if label is not None else None,
        created=float(created),  # type: ignore[arg-type]
        expires=float(expires) if expires is not None else None,  # type: ignore[arg-type]
        revoked=float(revoked) if revoked is not None else None,  # type: ignore[arg-type]
        app=str(app) if app is not None else None,
    )
