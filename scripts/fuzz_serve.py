"""The long bad-input run: thousands of generated hostile bodies against a real endpoint.

Starts the endpoint on a local Ray head from `--config` (the tiny model by default; a key is
made up), or targets a running one with `--url` and `--key`. Sends `--cases` bodies per route
(chat and completions) from the strategies in tests/serve/hostile.py, and reports: status codes,
5xx (must be 0), refusals not in OpenAI's error shape or holding internal text (must be 0), that a
normal request is answered afterwards, and the resident memory of the ingress and engine replicas
before and after. Prints one JSON summary; exit code 1 if any check failed.

    python scripts/fuzz_serve.py [--config configs/serve/tiny.yaml] [--cases 1000]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections import Counter

import httpx
from hypothesis import HealthCheck, given, settings
from serve_harness import normal_request, replica_rss_mb, start_endpoint

from tests.serve.fake_engine import INTERNAL
from tests.serve.hostile import bodies

ROUTES = {"chat": "/chat/completions", "completion": "/completions"}


def problem(response: httpx.Response, sent: str) -> str | None:
    """What is wrong with an answer to a hostile body, or None."""
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:300]}"
    if response.status_code < 400:
        bad = [line for line in response.text.splitlines() if line.startswith('data: {"error"')]
        return f"error event in a 200 stream: {bad[0][:300]}" if bad else None
    try:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and isinstance(error["type"], str)
    except (ValueError, KeyError, TypeError, AssertionError):
        return f"not OpenAI's error shape: {response.text[:300]}"
    leaked = [m for m in INTERNAL.findall(response.text) if m not in sent]
    return f"internal text {leaked}: {response.text[:300]}" if leaked else None


def fuzz(url: str, key: str, model: str, kind: str, cases: int, report: dict) -> None:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    statuses: Counter = Counter()
    problems: list[dict] = []
    client = httpx.Client(timeout=120)

    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(body=bodies(model, kind))
    def one(body: bytes) -> None:
        response = client.post(url + ROUTES[kind], content=body, headers=headers)
        statuses[response.status_code] += 1
        if (found := problem(response, body.decode(errors="replace"))) and len(problems) < 20:
            problems.append({"body": body[:300].decode(errors="replace"), "problem": found})

    started = time.monotonic()
    one()
    report[kind] = {
        "cases": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
        "5xx": sum(n for s, n in statuses.items() if s >= 500),
        "problems": problems,
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/serve/tiny.yaml")
    parser.add_argument("--url", default=None, help="a running endpoint's base URL (…/v1)")
    parser.add_argument("--key", default="sk-fuzz-" + os.urandom(6).hex())
    parser.add_argument("--model", default=None, help="model id (default: the config's)")
    parser.add_argument("--cases", type=int, default=1000, help="bodies per route")
    args = parser.parse_args()
    stop = None
    if args.url:
        url, model = args.url, args.model
    else:
        url, cfg, stop = start_endpoint(args.config, args.key)
        model = cfg.model_id
    model = args.model or model
    try:
        report: dict = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
            "config": None if args.url else args.config,
            # After a few plain requests, so first-use allocations do not count as growth.
            "normal_requests_before": [normal_request(url, args.key, model) for _ in range(5)],
            "memory_mb_before": replica_rss_mb(),
        }
        for kind in ROUTES:
            fuzz(url, args.key, model, kind, args.cases, report)
        report["normal_request_after"] = normal_request(url, args.key, model)
        report["memory_mb_after"] = replica_rss_mb()
    finally:
        if stop:
            stop()
    print(json.dumps(report, indent=2))
    failed = any(report[k]["5xx"] or report[k]["problems"] for k in ROUTES)
    return 1 if failed or not report["normal_request_after"]["answered"] else 0


if __name__ == "__main__":
    sys.exit(main())
