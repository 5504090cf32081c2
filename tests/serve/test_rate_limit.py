"""Fair use: request and token buckets per caller, the waits they tell, and a bounded table."""

from __future__ import annotations

import math

import pytest

from serve.access.budgets import Budgets, FairUse


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fair_use(clock, requests=None, burst=10, tokens=None, callers=100) -> FairUse:
    return FairUse(Budgets(requests, burst, tokens, callers), clock=clock)


def test_a_key_gets_its_burst_then_waits_for_the_rate():
    clock = FakeClock()
    limits = fair_use(clock, requests=60, burst=3)
    assert [limits.admit("a", 1) for _ in range(3)] == [None, None, None]
    refusal = limits.admit("a", 1)
    assert (refusal.limit, refusal.wait_s) == ("requests", pytest.approx(1.0))  # one per second
    clock.now += 0.5
    assert limits.admit("a", 1).wait_s == pytest.approx(0.5)
    clock.now += 0.5
    assert limits.admit("a", 1) is None


def test_keys_have_separate_buckets_and_refill_caps_at_the_burst():
    clock = FakeClock()
    limits = fair_use(clock, requests=6, burst=2)
    assert limits.admit("a", 1) is None and limits.admit("a", 1) is None
    assert limits.admit("a", 1).wait_s == pytest.approx(10.0)
    assert limits.admit("b", 1) is None  # another key is not slowed down by "a"
    clock.now += 3600  # an idle hour refills to the burst, not to 600 requests
    assert [limits.admit("a", 1) for _ in range(3)][2] is not None


def test_tokens_are_budgeted_per_minute_and_a_refused_request_is_not_charged():
    clock = FakeClock()
    limits = fair_use(clock, requests=600, burst=100, tokens=1200)  # 20 tokens per second
    assert limits.admit("a", 1000) is None
    refusal = limits.admit("a", 400)
    assert (refusal.limit, refusal.wait_s) == ("tokens", pytest.approx(10.0))
    assert limits.admit("a", 200) is None  # the refused 400 spent nothing: 200 were left
    assert limits.requests.level("a", clock.now) == pytest.approx(98)  # two admitted requests
    assert math.isinf(limits.admit("b", 1201).wait_s)  # more than a minute's worth: never


def test_the_caller_table_is_bounded_forgetting_the_least_recently_seen():
    clock = FakeClock()
    limits = fair_use(clock, requests=1, burst=1, callers=3)
    for caller in ("a", "b", "c"):
        assert limits.admit(caller, 1) is None
    assert limits.admit("a", 1) is not None  # "a" seen again: now the most recent
    for i in range(1000):
        limits.admit(f"spray-{i}", 1)
    assert len(limits.requests) == 3
