"""Bounded logs: each process's log is cut back when it passes its cap, keeping the newest lines.

The supervisor gives every process a log file opened with O_APPEND as its
stdout and stderr, and the process writes it directly, so that it outlives a
crashed supervisor (a pipe to the supervisor would break, and the process
with it). So the cut is logrotate's copytruncate: the newest part of
``NAME.log`` is copied to ``NAME.log.1`` and ``NAME.log`` is emptied; the
writer's next line lands at the start of the empty file (O_APPEND writes at
the end, wherever that is now). A line written in the instant between the
copy and the cut is lost. The supervisor checks every log several times a
second, so a log is at most its cap plus what its process writes between
two checks, and the older file at most its cap.

Not for the usage log (Envoy's, read by the gatekeeper into the ledger from
a saved offset): cutting it could lose lines not yet read, so it is left alone.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

LOG_MAX_BYTES = 10 * 1024 * 1024  # per file: NAME.log, and NAME.log.1 with what came before it
CHUNK = 1 << 20


def older(path: Path) -> Path:
    """The file that holds what came before ``path``'s last cut."""
    return path.with_name(path.name + ".1")


def cap(path: Path, max_bytes: int = LOG_MAX_BYTES) -> bool:
    """Cut ``path`` back if it is over ``max_bytes``: its newest ``max_bytes`` (from a line's start) become
    ``NAME.log.1``, replacing the one before, and ``path`` is emptied. Returns whether it cut."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size <= max_bytes:
        return False
    tmp = path.with_name(f".{path.name}.1.tmp")
    with path.open("rb") as src, tmp.open("wb") as dst:
        src.seek(size - max_bytes)
        src.readline()  # start at a whole line
        budget = max_bytes
        while budget > 0:  # up to the current end, however far it has moved while we copied (bounded)
            chunk = src.read(min(CHUNK, budget))
            if not chunk:
                break
            dst.write(chunk)
            budget -= len(chunk)
        os.truncate(path, 0)
    os.replace(tmp, older(path))
    return True


def tail_lines(path: Path, count: int) -> list[str]:
    """The last ``count`` lines of a log, reaching into ``NAME.log.1`` when the log was cut lately."""
    if count <= 0:
        return []
    lines = _last_lines(path, count)
    if len(lines) < count:
        lines = _last_lines(older(path), count - len(lines)) + lines
    return lines


def _last_lines(path: Path, count: int) -> list[str]:
    try:
        with path.open("r", encoding="utf-8", errors="replace") as handle:
            return list(deque(handle, maxlen=count))
    except FileNotFoundError:
        return []
