"""What every benchmark report shares: the machine it ran on, and its own section of a Markdown file."""

from __future__ import annotations

import os
import platform
from contextlib import suppress
from pathlib import Path


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
    doc.write_text(text)
