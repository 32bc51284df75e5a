"""Kernel limits a local stack needs before its processes start.

Envoy opens an inotify instance for each endpoint file it watches (controller/render/envoy.py,
`inotify_instances`), and Linux counts them per user against `fs.inotify.max_user_instances` (128 by default),
for all of that user's processes together. Past it Envoy aborts at start with an assertion; `controller up`
says so first, with the numbers and the command that fixes it.
"""

from __future__ import annotations

import os
from pathlib import Path

from controller.errors import ControllerError
from controller.plan.models import Plan
from controller.render import envoy

INOTIFY_LIMIT = Path("/proc/sys/fs/inotify/max_user_instances")
PROC = Path("/proc")


def inotify_in_use(uid: int | None = None) -> int:
    """The inotify instances that processes of ``uid`` (default: this process's user) hold, as /proc shows them
    (a process whose descriptors cannot be read counts none)."""
    uid = os.geteuid() if uid is None else uid
    count = 0
    for proc in PROC.glob("[0-9]*"):
        try:
            if proc.stat().st_uid != uid:
                continue
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        count += sum(1 for fd in fds if is_inotify(fd))
    return count


def is_inotify(fd: Path) -> bool:
    try:
        return os.readlink(fd) == "anon_inode:inotify"
    except OSError:
        return False


def check_inotify(plan: Plan) -> None:
    """Refuse a stack whose Envoy could not start for want of inotify instances."""
    try:
        limit = int(INOTIFY_LIMIT.read_text())
    except (OSError, ValueError):
        return  # not Linux, or a kernel that does not say: nothing to check
    need = envoy.inotify_instances(plan) - envoy.INOTIFY_OTHERS  # Envoy's own
    in_use = inotify_in_use()
    if in_use + need <= limit:
        return
    raise ControllerError(
        f"Envoy would watch {len(plan.fleet.models) + len(plan.workers)} endpoint files (about {need} inotify "
        f"instances) and this user's processes hold {in_use} of the {limit} that fs.inotify.max_user_instances "
        f"allows; raise it first, as root: `echo {in_use + need + envoy.INOTIFY_OTHERS} > {INOTIFY_LIMIT}` (and "
        "`fs.inotify.max_user_instances = N` in /etc/sysctl.d/60-fleet-envoy.conf to keep it)"
    )
