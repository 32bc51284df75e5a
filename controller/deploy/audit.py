"""The audit log of deploys: one JSON line per deploy in ``<fleet state>/audit.log``, appended and fsynced.

Each line says who deployed which spec (its digest) to which hosts, with `--check` or not, what changed per host
and how it ended. Lines are whole: one ``write`` of a line shorter than a pipe buffer on a file opened for append.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def append(path: Path, entry: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
