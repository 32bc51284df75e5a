"""The usage log's rotation: Envoy writes it forever; the gatekeeper, which reads it into the ledger, keeps it small
without losing a line.

One step after each reading of the log (the ingest loop):

1. When the log has grown past its limit and every line of it is in the ledger, it is renamed `usage.log.1`
   (and the console's live log beside it `live.log.1`). Envoy still writes the same file under its new name.
2. Envoy is asked to reopen its logs (`POST /reopen_logs` on its admin port): it flushes the old file, closes
   it and opens a new `usage.log`. Asked again each step while there is no new file (Envoy down, or the
   gatekeeper stopped between the rename and the ask).
3. The old file is read to its end (the ledger finds its saved offset by its inode, whatever its name), and
   deleted only once Envoy writes the new one, every line of the old one is in the ledger, and it has not grown
   for SETTLE_S (Envoy writes its buffer out every second). The live log's old file holds only the console's
   view of requests in flight: it is deleted once Envoy has reopened.

Crash-safe at every point: a rename, an ask and a deletion are each safe to repeat, and a line is never deleted
before the ledger's committed offset is past it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from controller.gateway.ledger import Ledger

MAX_BYTES = 64 * 1024 * 1024  # the usage log is rotated past this size
MAX_BYTES_ENV = "FLEET_USAGE_LOG_MAX_BYTES"  # another limit (tests, or a small disk)
SETTLE_S = 5.0  # an old file that has not grown for this long, after Envoy reopened, is done
ROTATED = ".1"


def max_bytes() -> int:
    value = os.environ.get(MAX_BYTES_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else MAX_BYTES


def envoy_reopen(admin_port: Callable[[], int]) -> Callable[[], bool]:
    """Ask the Envoy whose admin interface is on loopback port ``admin_port()`` to reopen its access logs."""

    def reopen() -> bool:
        try:
            return httpx.post(f"http://127.0.0.1:{admin_port()}/reopen_logs", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    return reopen


class Rotation:
    def __init__(
        self,
        usage_log: Path,
        live_log: Path | None,
        ledger: Ledger,
        reopen: Callable[[], bool],
        limit: int | None = None,
        settle_s: float = SETTLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.usage_log, self.live_log, self.ledger, self.reopen = usage_log, live_log, ledger, reopen
        self.limit = max_bytes() if limit is None else limit
        self.settle_s, self.clock = settle_s, clock
        self.old = usage_log.with_name(usage_log.name + ROTATED)
        self._size: tuple[int, float] | None = None  # the old file's size, and since when
        self.rotations = 0

    def step(self) -> None:
        """One step (see the module's docstring); call it after reading the usage log."""
        if self.old.exists():
            self._finish()
            return
        try:
            size = self.usage_log.stat().st_size
        except FileNotFoundError:
            return
        if size < self.limit or self.ledger.read_to(self.usage_log) != size:
            return  # small enough, or lines not yet in the ledger (they are read first)
        os.replace(self.usage_log, self.old)
        if self.live_log is not None and self.live_log.exists():
            os.replace(self.live_log, self.live_log.with_name(self.live_log.name + ROTATED))
        self.rotations += 1
        print(f"usage log rotated at {size} bytes (limit {self.limit})", flush=True)
        self._size = None
        self.reopen()

    def _finish(self) -> None:
        self.ledger.ingest(self.old)
        if not self.usage_log.exists():
            self.reopen()  # not asked yet, or Envoy was not there to hear it
            if not self.usage_log.exists():
                return
        if self.live_log is not None:
            self.live_log.with_name(self.live_log.name + ROTATED).unlink(missing_ok=True)
        size, now = self.old.stat().st_size, self.clock()
        if self._size is None or self._size[0] != size:
            self._size = (size, now)
            return
        if now - self._size[1] < self.settle_s or self.ledger.read_to(self.old) != size:
            return
        self.ledger.forget(self.old)
        self.old.unlink()
        self._size = None
        print(f"rotated usage log read to its end ({size} bytes) and removed", flush=True)
