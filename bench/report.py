"""What every benchmark report shares: the machine it ran on, and its own section of a Markdown file."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

from controller.atomic import write_file

Result = TypeVar("Result")


def machine() -> str:
    cpu = "unknown CPU"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f", {kb / 2**20:.1f} GiB RAM"
    return (
        f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def write_section(doc: Path, begin: str, end: str, section: str, heading: str) -> None:
    """Replace the text between ``begin`` and ``end`` markers (a new section under ``heading`` if absent)."""
    text = doc.read_text() if doc.exists() else "# Performance\n"
    if begin in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + section + "\n"
    write_file(doc, text)  # a run stopped half-way leaves the report as it was


def publish(
    result: Result,
    markdown: Callable[[Result, str], str],
    *,
    prog: str,
    as_json: bool,
    write: Path | None,
    section: tuple[str, str, str],
    document: Any = None,
) -> None:
    """A benchmark's ending: its JSON (``document``, else ``result``) with `--json`, else its Markdown section; with
    `--write`, that section put into the file between ``section``'s begin and end markers, under its heading."""
    command = f"python -m {prog} {' '.join(sys.argv[1:])}".strip()
    text = markdown(result, command)
    if as_json:
        print(json.dumps(result if document is None else document, indent=2))
    if write:
        begin, end, heading = section
        write_section(write, begin, end, text, heading)
    if not as_json:
        print(text)
