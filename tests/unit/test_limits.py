"""The request-rate limiter, with leases: never more than the limit, however the leases are cut."""

from __future__ import annotations

from controller.gateway.limits import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refill() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    assert [limiter.take("u", 3)[0] for _ in range(4)] == [1, 1, 1, 0]
    granted, wait = limiter.take("u", 3)
    assert granted == 0 and 19 < wait <= 20  # one request per 20 s at 3 rpm
    clock.now += 20
    assert limiter.take("u", 3) == (1, 0.0)


def test_a_lease_is_capped_by_what_the_bucket_holds() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    assert limiter.take("u", 60, want=50)[0] == 50
    assert limiter.take("u", 60, want=50)[0] == 10  # only 10 left of the 60 burst
    assert limiter.take("u", 60, want=50)[0] == 0
    clock.now += 2.5
    assert limiter.take("u", 60, want=50)[0] == 2  # refilled at 1/s: 2.5 tokens, whole requests only


def test_leases_never_exceed_the_rate_over_time() -> None:
    """Two Envoy workers taking leases every 100 ms for a minute stay within burst + rate × time."""
    clock = Clock()
    limiter = RateLimiter(clock)
    rpm = 120
    want = limiter.lease_size(rpm, 2.0)
    assert want == 4  # 2 requests/s × 2 s
    served = 0
    for _ in range(600):
        for _worker in range(2):
            served += limiter.take("u", rpm, want)[0]
        clock.now += 0.1
    assert served <= rpm + rpm / 60 * 60  # burst plus one minute of refill
    assert served >= rpm + rpm / 60 * 60 - 2 * want  # and the limit is not much undercut either


def test_users_are_independent_and_lease_size_is_at_least_one() -> None:
    limiter = RateLimiter(Clock())
    assert limiter.take("a", 1)[0] == 1
    assert limiter.take("a", 1)[0] == 0
    assert limiter.take("b", 1)[0] == 1
    assert limiter.lease_size(1, 0.001) == 1
