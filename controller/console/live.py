"""Requests in flight and recently done, from Envoy's live log: no Python on the request path.

Envoy writes one JSON line per inference request every second while it runs (an access log of type
`DownstreamPeriodic`: the HTTP connection manager's `access_log_flush_interval`) and, for a request that ran long
enough to have had one, one when it ends (`DownstreamEnd`), into its own file beside the usage log
(controller/render/envoy.py, `live_log_config`). Each line names the request id, user, key, app, model, the
upstream it went to, how long it has run, when its first byte came back and the stream events the Lua filter has
counted so far. This module reads that file from where it stopped and keeps the requests whose last line is fresh.

The requests that ended come from the usage log instead, which has a line for every one: the gatekeeper's ledger
parses it anyway and hands each batch's last lines to `ended` (`Ledger.ended`), which keeps the last `RECENT`.
So a short request costs Envoy one log line, not two, and nothing parses it twice; it is seen only ending. The file is cut back to empty once past
`MAX_BYTES` (Envoy opens it to append, so its next line starts the file again); the few lines written between
the last read and the cut are lost, which costs the view at most a second of one request, never usage: the
ledger reads the usage log, not this one.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

RECENT = 50  # requests kept after they end
STALE_S = 3.0  # a request whose last line is older than this is taken for ended (its end line was cut away)
MAX_BYTES = 4 * 1024 * 1024
READ_MAX = 1024 * 1024  # at most this much is read per refresh


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str | None:
    return None if value in (None, "", "-") else str(value)


class LiveLog:
    def __init__(
        self, path: Path, worker_of: Callable[[str | None], str | None], clock: Callable[[], float] = time.time
    ):
        """``worker_of``: the worker an upstream address (``host:port``, as Envoy logs it) belongs to."""
        self.path = path
        self.worker_of = worker_of
        self.clock = clock
        self.offset: int | None = None  # None: not opened yet (the first read starts at the end)
        self.inode: int | None = None
        self.partial = b""
        self.in_flight: dict[str, dict[str, Any]] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.lock = threading.Lock()

    def refresh(self) -> None:
        """Read what Envoy wrote since the last call."""
        with self.lock:
            for line in self._new_lines():
                try:
                    raw = json.loads(line)
                except ValueError:
                    continue  # a torn line (the cut)
                if isinstance(raw, dict):
                    self._take(raw)
            now = self.clock()
            for rid in [r for r, row in self.in_flight.items() if now - row["seen"] > STALE_S]:
                del self.in_flight[rid]

    def _new_lines(self) -> list[bytes]:
        try:
            st = self.path.stat()
        except OSError:
            self.offset, self.partial = 0, b""
            return []
        if self.offset is None:  # requests that ended before the console started are not replayed
            self.offset, self.inode = st.st_size, st.st_ino
            return []
        if st.st_ino != self.inode or st.st_size < self.offset:  # replaced or cut: from the start
            self.offset, self.inode, self.partial = 0, st.st_ino, b""
        if st.st_size == self.offset:
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read(READ_MAX)
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        if self.offset > MAX_BYTES:
            self._cut()
        return [line for line in lines if line.strip()]

    def _cut(self) -> None:
        try:
            os.truncate(self.path, 0)
        except OSError:
            return  # read-only here: Envoy's file grows until it is rotated
        self.offset, self.partial = 0, b""

    def ended(self, raws: list[dict[str, Any]]) -> None:
        """Requests that ended, as the usage log has them (oldest first): the newest kept, newest first."""
        with self.lock:
            for raw in raws:
                rid = _text(raw.get("request_id")) if isinstance(raw, dict) else None
                if rid is None:
                    continue
                self.in_flight.pop(rid, None)
                try:
                    row = self._row(raw, rid)
                except (TypeError, ValueError):
                    continue  # not a line Envoy wrote (its time is no number): the ledger skipped it too
                row.update(
                    status=_int(raw.get("status")),
                    flags=_text(raw.get("flags")),
                    prompt_tokens=_int(raw.get("prompt_tokens")),
                    completion_tokens=_int(raw.get("completion_tokens")),
                )
                self.recent.appendleft(row)

    def _row(self, raw: dict[str, Any], rid: str) -> dict[str, Any]:
        ms = _int(raw.get("ms")) or 0
        ttfb = _int(raw.get("ttfb_ms"))
        upstream = _text(raw.get("upstream"))
        return {
            "request_id": rid,
            "user": _text(raw.get("user")),
            "key_id": _text(raw.get("key_id")),
            "app": _text(raw.get("app")),
            "model": _text(raw.get("model")),
            "worker": self.worker_of(upstream),
            "upstream": upstream,
            "started": float(raw.get("time") or 0),
            "duration_s": round(ms / 1000, 3),
            "ttfb_s": None if ttfb is None else round(ttfb / 1000, 3),
            "stream": raw.get("stream") == "1",
            "seen": self.clock(),
        }

    def _take(self, raw: dict[str, Any]) -> None:
        rid = _text(raw.get("request_id"))
        if rid is None:
            return
        if raw.get("type") == "DownstreamPeriodic":
            row = self._row(raw, rid)
            ms = _int(raw.get("ms")) or 0
            ttfb = _int(raw.get("ttfb_ms"))
            events = _int(raw.get("events")) or 0
            # No byte back yet: the backend is reading the prompt (prefill) or the request waits for a worker.
            generating = ttfb is not None
            rate = events / max(0.001, (ms - ttfb) / 1000) if generating and ttfb is not None and ms > ttfb else None
            row.update(
                phase="generating" if generating else "prefill",
                tokens=events if row["stream"] else None,
                tokens_per_s=None if rate is None or not row["stream"] else round(rate, 1),
            )
            self.in_flight[rid] = row
            return
        self.in_flight.pop(rid, None)  # its row in `recent` comes from the usage log (`ended`)

    def view(self) -> dict[str, list[dict[str, Any]]]:
        with self.lock:
            flying = sorted(self.in_flight.values(), key=lambda r: r["started"])
            return {
                "in_flight": [{k: v for k, v in r.items() if k != "seen"} for r in flying],
                "recent": [{k: v for k, v in r.items() if k != "seen"} for r in self.recent],
            }
