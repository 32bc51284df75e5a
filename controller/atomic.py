"""Write a whole tree of files so that readers never see half of it.

Each file is written to a temporary sibling, flushed, and renamed into place
(rename is atomic on POSIX). A tree is first staged completely in a fresh
folder next to the target; only when every file is written are they moved
into the target. A failure while staging leaves the target untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_file(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tree(root: Path, files: dict[str, str], modes: dict[str, int] | None = None) -> list[str]:
    """Write ``files`` under ``root``; return the paths that changed.

    Paths must be relative and stay inside ``root``. Files of ``root`` that
    are not in ``files`` are left alone (render output may sit beside other
    things); use ``stale_files`` to find them.
    """
    modes = modes or {}
    for rel in files:
        _check_relative(rel)
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".render-", dir=root))
    changed: list[str] = []
    try:
        for rel, text in files.items():
            target = root / rel
            if target.is_file() and target.read_text(encoding="utf-8") == text:
                continue
            staged = stage / rel
            staged.parent.mkdir(parents=True, exist_ok=True)
            staged.write_text(text, encoding="utf-8", newline="\n")
            os.chmod(staged, modes.get(rel, 0o644))
            changed.append(rel)
        for rel in changed:
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return changed


def _check_relative(rel: str) -> None:
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or ".." in parts:
        raise ValueError(f"refusing to write outside the output folder: {rel!r}")
