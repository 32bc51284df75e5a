"""One deploy of a fleet at a time: an exclusive lock on a file in the controller's state, naming its holder.

The lock is ``fcntl.flock`` on ``deploy.lock``: the kernel drops it when the holder exits, however it exits, so a
crashed deploy never leaves the fleet locked. Its holder writes who and since when into the file, so a second
deploy can say whom it waits for; it waits up to ``wait_s`` and then refuses (exit 75, "try again later").
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from controller.errors import DeployError


class LockHeld(DeployError):
    exit_code = 75  # EX_TEMPFAIL: nothing was done; try again once the other deploy has finished


def holder_line(info: dict[str, object]) -> str:
    since = float(str(info.get("since", 0)) or 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if since else "an unknown time"
    return f"{info.get('user', '?')}@{info.get('host', '?')} (pid {info.get('pid', '?')}, {info.get('command', '')}) since {stamp}"


@contextmanager
def fleet_lock(path: Path, fleet: str, command: str, wait_s: float = 0) -> Iterator[dict[str, object]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockHeld(
                        f"fleet {fleet} is being deployed by {holder_line(_read(path))}; nothing was changed. Wait for it "
                        "to finish, or pass --wait SECONDS to queue behind it"
                    ) from None
                time.sleep(0.2)
        info: dict[str, object] = {
            "user": getpass.getuser(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.time(),
            "command": command,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield info
    finally:
        os.close(fd)  # releases the lock


def _read(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
