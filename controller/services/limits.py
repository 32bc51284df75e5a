"""Request-rate limits: a token bucket per user, refilled continuously.

A user with `rpm: 60` may burst up to 60 requests, then one per second.
In memory: a gatekeeper restart gives everyone a full bucket, which errs on
the side of serving.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # user → (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, user: str, rpm: int) -> float:
        """Take one request from ``user``'s bucket; 0 when allowed, else seconds until one is."""
        now = self._clock()
        rate = rpm / 60.0
        with self._lock:
            tokens, last = self._buckets.get(user, (float(rpm), now))
            tokens = min(float(rpm), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[user] = (tokens - 1.0, now)
                return 0.0
            self._buckets[user] = (tokens, now)
            return (1.0 - tokens) / rate
