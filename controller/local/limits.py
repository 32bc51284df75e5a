"""Kernel limits a local stack needs before its processes start.

Envoy opens an inotify instance for each endpoint file it watches (controller/render/envoy.py,
`inotify_instances`), and Linux counts them per user against `fs.inotify.max_user_instances` (128 by default),
for all of that user's processes together. Past it Envoy aborts at start with an assertion (and a running Envoy
cannot watch a new endpoint file); `controller up` says so first, at the first start and on a reload, with the
numbers and the command that fixes it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
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


def check_inotify(plan: Plan, watched: Iterable[str] | None = None) -> None:
    """Refuse a stack whose Envoy could not start, or (``watched``: the endpoint files a running Envoy watches
    already, on a reload) could not watch the new plan's new endpoint files, for want of inotify instances."""
    try:
        limit = int(INOTIFY_LIMIT.read_text())
    except (OSError, ValueError):
        return  # not Linux, or a kernel that does not say: nothing to check
    if watched is None:
        files = len(plan.fleet.models) + len(plan.workers)
        need = envoy.inotify_instances(plan) - envoy.INOTIFY_OTHERS  # Envoy's own
        what = f"Envoy would watch {files} endpoint files (about {need} inotify instances)"
    else:  # the running Envoy holds its instances already (counted in use): only new files need more
        need = len(set(envoy.eds_files(plan)) - set(watched))
        what = (
            f"the changed spec gives the running Envoy {need} more endpoint file{'' if need == 1 else 's'} to watch "
            "(an inotify instance each)"
        )
    in_use = inotify_in_use()
    if in_use + need <= limit:
        return
    raise ControllerError(
        f"{what} and this user's processes hold {in_use} of the {limit} that fs.inotify.max_user_instances "
        f"allows; raise it first, as root: `echo {in_use + need + envoy.INOTIFY_OTHERS} > {INOTIFY_LIMIT}` (and "
        "`fs.inotify.max_user_instances = N` in /etc/sysctl.d/60-fleet-envoy.conf to keep it)"
    )
