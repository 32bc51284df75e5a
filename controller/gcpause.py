"""Bulk work without the cyclic garbage collector's pauses.

Loading, planning and rendering a large fleet make millions of objects that stay alive until the work is done
(the spec's models, the plan, every rendered document and its YAML events). Each of Python's collections walks
all of them, and with the collector on they took about half of a 1,000-host render (bench/control_plane.py,
issue 17). The work makes almost no reference cycles, so the collector finds nothing to free: it is paused for
the work, and runs again as before afterwards.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The collector off for the block (or the decorated call); back on after it if it was on before."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
