"""Overload on loopback: a concurrency sweep to 4x saturation, then a soak at saturation.

Starts the endpoint of `--config` on a local Ray head with one engine replica, so saturation is
one number: `max_ongoing_requests`, the requests a replica works on at once (past it requests
wait in the queue, `max_queued_requests`, and past that get 503 with Retry-After). Closed-loop
callers each send streamed chat requests of exactly `--tokens` tokens, one after another; a
refused caller waits `--refused-pause` seconds (less than Retry-After asks: a pushy client) and
tries again.

Checks, exit code 1 if any fails: only 200, 429 and 503 answers, each refusal with Retry-After
and OpenAI's error shape, no request unanswered within `--timeout`; over the soak the replicas'
resident memory grows under 10%; a normal request is answered afterwards. Reported, not checked:
p50/p99 latency of admitted requests per level and per soak minute, against the 2 s window.

    python scripts/load_serve.py [--config configs/serve/demo.yaml] [--soak-minutes 10]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass

import httpx
from serve_harness import (
    REPO,
    end_token_bias,
    normal_request,
    percentile,
    replica_rss_mb,
    start_endpoint,
)

KEY = "sk-load-" + os.urandom(6).hex()
ALLOWED = {200, 429, 503}
WINDOW_S = 2.0  # the product's latency promise for a short answer
MEMORY_GROWTH = 0.10


@dataclass
class Outcome:
    started: float  # seconds since the run began
    status: int | None  # None: no answer within the timeout, or the connection broke
    latency: float
    ttft: float | None = None
    refusal_ok: bool = True  # a 429/503 carried Retry-After and OpenAI's error shape


async def one_request(client: httpx.AsyncClient, url: str, body: dict, t0: float) -> Outcome:
    started = time.perf_counter()
    ttft = None
    try:
        async with client.stream(
            "POST", f"{url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return Outcome(
                    started - t0,
                    response.status_code,
                    time.perf_counter() - started,
                    refusal_ok=_is_refusal(response, text),
                )
            async for line in response.aiter_lines():
                if ttft is None and line.startswith("data: ") and '"content"' in line:
                    ttft = time.perf_counter() - started
            return Outcome(started - t0, 200, time.perf_counter() - started, ttft)
    except httpx.HTTPError:
        return Outcome(started - t0, None, time.perf_counter() - started)


def _is_refusal(response: httpx.Response, text: str) -> bool:
    if response.status_code not in (429, 503) or "retry-after" not in response.headers:
        return False
    try:
        return set(json.loads(text)["error"]) >= {"message", "type", "code"}
    except (ValueError, KeyError, TypeError):
        return False


async def closed_loop(
    url: str, body: dict, concurrency: int, seconds: float, args, t0: float
) -> list[Outcome]:
    """`concurrency` callers, each sending one request after another for `seconds`."""
    outcomes: list[Outcome] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency + 8)

    async def caller(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            outcome = await one_request(client, url, body, t0)
            outcomes.append(outcome)
            if outcome.status != 200:
                await asyncio.sleep(args.refused_pause)

    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        await asyncio.gather(*(caller(client) for _ in range(concurrency)))
    return outcomes


def summary(outcomes: list[Outcome], seconds: float, tokens: int) -> dict:
    statuses = Counter("timeout" if o.status is None else o.status for o in outcomes)
    admitted = [o for o in outcomes if o.status == 200]
    latencies = [o.latency for o in admitted]
    ttfts = [o.ttft for o in admitted if o.ttft is not None]
    return {
        "requests": len(outcomes),
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
        "bad_refusals": sum(not o.refusal_ok for o in outcomes if o.status in (429, 503)),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "answers_per_s": len(admitted) / seconds,
        "tokens_per_s": len(admitted) * tokens / seconds,
    }


def unexpected(stats: dict) -> list[str]:
    return [s for s in stats["statuses"] if s == "timeout" or int(s) not in ALLOWED]


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def print_sweep(rows: list[dict]) -> None:
    print(
        "\n| callers | x saturation | requests | 200 | 429 | 503 | other | p50 ms | p99 ms "
        "| TTFT p50 ms | answers/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["statuses"]
        other = sum(v for k, v in s.items() if k not in ("200", "429", "503"))
        print(
            f"| {r['callers']} | {r['x_saturation']:g} | {r['requests']} | {s.get('200', 0)} | "
            f"{s.get('429', 0)} | {s.get('503', 0)} | {other} | {ms(r['latency_p50_s'])} | "
            f"{ms(r['latency_p99_s'])} | {ms(r['ttft_p50_s'])} | {r['answers_per_s']:.1f} |"
        )


def print_soak(rows: list[dict]) -> None:
    print("\n| minute | requests | 200 | 503 | other | p50 ms | p99 ms | engine MB | ingress MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["statuses"]
        other = sum(v for k, v in s.items() if k not in ("200", "503"))
        print(
            f"| {r['minute']} | {r['requests']} | {s.get('200', 0)} | {s.get('503', 0)} | "
            f"{other} | {ms(r['latency_p50_s'])} | {ms(r['latency_p99_s'])} | "
            f"{r['memory_mb'].get('engine', '-')} | {r['memory_mb'].get('ingress', '-')} |"
        )


def run(url: str, model: str, saturation: int, body: dict, args) -> dict:
    t0 = time.perf_counter()
    asyncio.run(closed_loop(url, body, 2, 10, args, t0))  # warm-up: first-use allocations
    report: dict = {"saturation": saturation, "sweep": [], "soak": []}
    for factor in (0.25, 0.5, 1, 2, 4):
        callers = max(1, round(saturation * factor))
        outcomes = asyncio.run(closed_loop(url, body, callers, args.step_seconds, args, t0))
        stats = summary(outcomes, args.step_seconds, args.tokens)
        report["sweep"].append({"callers": callers, "x_saturation": factor, **stats})
        print(f"[load] {callers} callers: {stats}", flush=True)
    report["memory_mb_soak_start"] = replica_rss_mb()
    for minute in range(1, args.soak_minutes + 1):
        outcomes = asyncio.run(closed_loop(url, body, saturation, 60, args, t0))
        stats = summary(outcomes, 60, args.tokens)
        report["soak"].append({"minute": minute, **stats, "memory_mb": replica_rss_mb()})
        print(f"[soak] minute {minute}: {report['soak'][-1]}", flush=True)
    report["memory_mb_soak_end"] = replica_rss_mb()
    report["normal_request_after"] = normal_request(url, KEY, model)
    return report


def verdict(report: dict) -> list[str]:
    failures = []
    for row in report["sweep"] + report["soak"]:
        if bad := unexpected(row):
            failures.append(f"unexpected answers {bad} in {row}")
        if row["bad_refusals"]:
            failures.append(f"{row['bad_refusals']} refusals without Retry-After/error shape")
    start, end = report["memory_mb_soak_start"], report["memory_mb_soak_end"]
    for role, before in start.items():
        growth = (end.get(role, 0) - before) / before
        report.setdefault("memory_growth", {})[role] = round(growth, 4)
        if growth >= MEMORY_GROWTH:
            failures.append(f"{role} memory grew {growth:.1%} over the soak")
    if not report["normal_request_after"]["answered"]:
        failures.append("a normal request was not answered after the soak")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/serve/demo.yaml")
    parser.add_argument("--port", type=int, default=8001, help="HTTP port of the endpoint")
    parser.add_argument("--tokens", type=int, default=16, help="tokens in every answer")
    parser.add_argument("--step-seconds", type=float, default=30)
    parser.add_argument("--soak-minutes", type=int, default=10)
    parser.add_argument("--refused-pause", type=float, default=0.25)
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()
    overrides = {"autoscaling": {"min_replicas": 1, "max_replicas": 1}, "http_port": args.port}
    logging.getLogger("httpx").setLevel(logging.WARNING)
    url, cfg, stop = start_endpoint(str(REPO / args.config), KEY, overrides=overrides, quiet=True)
    from cluster.core.state import StateDir

    body = {
        "model": cfg.model_id,
        "messages": [{"role": "user", "content": "My order arrived damaged. What should I do?"}],
        "max_tokens": args.tokens,
        "stream": True,
        "temperature": 0,
        "logit_bias": end_token_bias(StateDir.resolve(None).base_model(cfg.model.base)),
    }
    try:
        report = run(url, cfg.model_id, cfg.max_ongoing_requests, body, args)
    finally:
        stop()
    report.update(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        config=args.config,
        max_queued_requests=cfg.max_queued_requests,
        tokens=args.tokens,
    )
    failures = verdict(report)
    report["failures"] = failures
    out = StateDir.resolve(None).root / "bench" / f"load-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_sweep(report["sweep"])
    print_soak(report["soak"])
    print(f"\nmemory growth over the soak: {report.get('memory_growth')}; report: {out}")
    print("failures: " + ("; ".join(failures) if failures else "none"))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
