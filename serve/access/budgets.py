"""Fair use: per-caller budgets of requests and of tokens per minute, as token buckets.

A caller is an API key (by its hash) or, when no keys are configured, the client's address, so
made-up bearer strings cannot open new budgets. A request is admitted only when both budgets hold
it, and only then charged: one request, and its tokens as the ingress estimates them before the
engine sees it (prompt characters / 4 + max_tokens x n). Each table remembers at most
`max_callers` callers, forgetting the least recently seen, so it cannot grow without bound.

Each ingress replica keeps its own buckets (no shared store on the request path), so with N
ingress replicas a caller gets up to N times the limits; the fedforge app runs one ingress replica.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from serve.answers.errors import openai_error


class Buckets:
    """One token bucket per caller: `capacity` at most, refilled at `per_minute`."""

    def __init__(self, per_minute: float, capacity: float, max_callers: int):
        self.rate = per_minute / 60  # per second
        self.capacity = capacity
        self.max_callers = max_callers
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (level, last update)

    def level(self, caller: str, now: float) -> float:
        level, last = self._buckets.get(caller, (self.capacity, now))
        return min(self.capacity, level + (now - last) * self.rate)

    def wait_s(self, caller: str, cost: float, now: float) -> float:
        """Seconds until `cost` fits (0: now; inf: never, it exceeds the capacity)."""
        if cost > self.capacity:
            return math.inf
        return max(0.0, (cost - self.level(caller, now)) / self.rate)

    def take(self, caller: str, cost: float, now: float) -> None:
        level = self.level(caller, now) - cost
        self._buckets.pop(caller, None)  # re-inserted last: dict order is recency order
        self._buckets[caller] = (level, now)
        if len(self._buckets) > self.max_callers:
            del self._buckets[next(iter(self._buckets))]  # the least recently seen

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True)
class Refusal:
    wait_s: float  # math.inf when the request can never fit the budget
    limit: str  # "requests" or "tokens"
    per_minute: float


@dataclass(frozen=True)
class Budgets:
    """Per-caller limits (auth section of the serve config); None: that budget is unlimited."""

    requests_per_minute: float | None
    request_burst: int
    tokens_per_minute: int | None
    max_callers: int


class FairUse:
    def __init__(self, budgets: Budgets, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        requests, tokens = budgets.requests_per_minute, budgets.tokens_per_minute
        self.requests = (
            Buckets(requests, budgets.request_burst, budgets.max_callers) if requests else None
        )
        # A key may spend one minute's worth of tokens at once.
        self.tokens = Buckets(tokens, tokens, budgets.max_callers) if tokens else None

    def admit(self, caller: str, tokens: int) -> Refusal | None:
        """None when `caller` may send this request now (and charges it), else why not."""
        now = self.clock()
        charges = [(self.requests, 1, "requests"), (self.tokens, tokens, "tokens")]
        charges = [(bucket, cost, limit) for bucket, cost, limit in charges if bucket is not None]
        refusals = [
            Refusal(wait, limit, bucket.rate * 60)
            for bucket, cost, limit in charges
            if (wait := bucket.wait_s(caller, cost, now)) > 0
        ]
        if refusals:
            return max(refusals, key=lambda r: r.wait_s)
        for bucket, cost, _ in charges:
            bucket.take(caller, cost, now)
        return None


def over_budget(refusal: Refusal, tokens: int) -> JSONResponse:
    """The refusal in OpenAI's shape: 429 with Retry-After, or 400 for a request of `tokens`
    that no wait would admit."""
    if math.isinf(refusal.wait_s):
        return openai_error(
            400,
            f"This request may use about {tokens} tokens, more than the "
            f"{refusal.per_minute:g} tokens per minute allowed; lower max_tokens or n.",
            param="max_tokens",
            code="request_over_budget",
        )
    unit = "requests" if refusal.limit == "requests" else "tokens"
    retry_after = math.ceil(refusal.wait_s)
    return openai_error(
        429,
        f"Rate limit reached ({refusal.per_minute:g} {unit} per minute); "
        f"retry after {retry_after} s.",
        type_=unit,
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry_after)},
    )
