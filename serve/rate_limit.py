"""Per-key request rate limit: a token bucket for each API key (by its hash).

Each ingress replica keeps its own buckets (no shared store on the request path), so with N
ingress replicas a key gets up to N times the limit; the fedforge app runs one ingress replica.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60  # tokens per second
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, last update)

    def wait_s(self, caller: str) -> float:
        """0 when `caller` may send a request now (and counts it), else seconds until it may."""
        now = self.clock()
        tokens, last = self._buckets.get(caller, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[caller] = (tokens - 1, now)
            return 0.0
        self._buckets[caller] = (tokens, now)
        return (1 - tokens) / self.rate
