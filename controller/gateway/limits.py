"""Request-rate limits: a token bucket per user, refilled continuously.

A user with `rpm: 60` may burst up to 60 requests, then one per second.
In memory: a gatekeeper restart gives everyone a full bucket, which errs on
the side of serving.

Envoy asks for a *lease*: up to ``want`` requests at once, taken from the
bucket when granted, which its Lua filter then spends without asking again
(see envoy/model_router.lua). Tokens are taken before they are spent, so a
user can never exceed the limit; a lease left unspent when it expires is
lost, which errs on the side of the limit.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # user → (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, user: str, rpm: int, want: int = 1) -> tuple[int, float]:
        """Take up to ``want`` requests from ``user``'s bucket.

        Returns (granted, 0.0) with 1 ≤ granted ≤ want when at least one is
        available, else (0, seconds until one is).
        """
        now = self._clock()
        rate = rpm / 60.0
        with self._lock:
            tokens, last = self._buckets.get(user, (float(rpm), now))
            tokens = min(float(rpm), tokens + (now - last) * rate)
            if tokens >= 1.0:
                granted = max(1, min(want, math.floor(tokens)))
                self._buckets[user] = (tokens - granted, now)
                return granted, 0.0
            self._buckets[user] = (tokens, now)
            return 0, (1.0 - tokens) / rate

    def lease_size(self, rpm: int, seconds: float) -> int:
        """How many requests one lease may carry: what the rate refills in ``seconds``, at least one."""
        return max(1, math.floor(rpm / 60.0 * seconds))
