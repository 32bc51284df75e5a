"""CPU and memory of the processes a benchmark watches, from /proc: each labelled process with its descendants."""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path
from typing import Any

ALONE = ("supervisor",)  # the parent of every stack process: counted without its children
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _tree(pid: int, kids: dict[int, list[int]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _per_label(pids: dict[str, int], read: Any) -> dict[str, int]:
    """Sum ``read(pid)`` over each labelled process and its live descendants (only itself for ALONE)."""
    kids = _children()
    out: dict[str, int] = {}
    for label, pid in pids.items():
        total = 0
        for p in [pid] if label in ALONE else _tree(pid, kids):
            with suppress(OSError, IndexError):
                total += read(p)
        out[label] = total
    return out


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """utime+stime of each labelled process (with its descendants, but for ALONE)."""
    return {label: ticks / TICKS for label, ticks in _per_label(pids, _cpu_ticks).items()}


def rss_mib(pids: dict[str, int]) -> dict[str, float]:
    pages = _per_label(pids, lambda p: int(Path(f"/proc/{p}/statm").read_text().split()[1]))
    return {label: round(n * PAGE / 2**20, 1) for label, n in pages.items()}
