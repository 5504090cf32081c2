"""The per-key token bucket: bursts, refill, separate keys, and the wait it tells callers."""

from __future__ import annotations

import pytest

from serve.rate_limit import RateLimiter


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_key_gets_its_burst_then_waits_for_the_rate():
    clock = FakeClock()
    limiter = RateLimiter(per_minute=60, burst=3, clock=clock)
    assert [limiter.wait_s("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.wait_s("a") == pytest.approx(1.0)  # one token per second
    clock.now += 0.5
    assert limiter.wait_s("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.wait_s("a") == 0


def test_keys_have_separate_buckets_and_refill_caps_at_the_burst():
    clock = FakeClock()
    limiter = RateLimiter(per_minute=6, burst=2, clock=clock)
    assert limiter.wait_s("a") == 0 and limiter.wait_s("a") == 0
    assert limiter.wait_s("a") == pytest.approx(10.0)
    assert limiter.wait_s("b") == 0  # another key is not slowed down by "a"
    clock.now += 3600  # an idle hour refills to the burst, not to 600 requests
    assert [limiter.wait_s("a") for _ in range(3)][2] > 0
