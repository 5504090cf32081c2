"""What the request log costs the ingress per answer, against no log, in the same run.

The ingress (serve.ingress.KeyCheckedIngress, on the routes serve.ingress gives it) answers over
ASGI in-process from a stub engine that returns a fixed chat answer at once, so the table shows only
the ingress' own work per request: keys, contract, relabelling, and with the log on, the entry
(and the prompt's features) written. Prompts of 100, 2,000 and 32,000 characters (the contract's
largest).

    python scripts/bench_request_log.py [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from fastapi.responses import JSONResponse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.core.credentials import hash_api_key  # noqa: E402
from cluster.core.serve_config import LimitSettings  # noqa: E402
from serve.answers.log import AnswerLogSettings  # noqa: E402
from serve.contract.fields import Bounds  # noqa: E402
from serve.ingress import ENDPOINTS, KeyCheckedIngress, ingress_app  # noqa: E402
from serve.ray_internal import ModelCard  # noqa: E402
from serve.settings import ServingSettings  # noqa: E402

KEY, BASE = "sk-bench", "bench-base"
ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "model": BASE, "choices": []}
USAGE = {"prompt_tokens": 30, "completion_tokens": 8, "total_tokens": 38}
WORDS = ("please", "route", "this", "ticket", "about", "my", "order", "refund", "and", "billing")


async def stub_engine(body, call_method: str, raw_request=None):
    return JSONResponse({**ANSWER, "usage": USAGE})


def client(log: AnswerLogSettings | None) -> httpx.AsyncClient:
    card = ModelCard(id=BASE, object="model", owned_by="bench", permission=[], metadata={})
    settings = ServingSettings(
        key_hashes=(hash_api_key(KEY),), contract=Bounds(LimitSettings(), 2048), answer_log=log
    )
    ingress = KeyCheckedIngress({BASE: None}, {BASE: card}, settings=settings)
    ingress._process_llm_request = stub_engine
    app = ingress_app()
    for name, route in ENDPOINTS.items():
        route(app)(getattr(ingress, name))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://ingress")


async def per_request_ms(log: AnswerLogSettings | None, prompt: str, requests: int) -> float:
    body = {"model": BASE, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8}
    headers = {"Authorization": f"Bearer {KEY}"}
    async with client(log) as http:
        for _ in range(20):  # warm-up
            await http.post("/v1/chat/completions", json=body, headers=headers)
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            response = await http.post("/v1/chat/completions", json=body, headers=headers)
            times.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    with tempfile.TemporaryDirectory() as tmp:

        def logged(features: bool) -> AnswerLogSettings:
            return AnswerLogSettings(
                directory=str(Path(tmp) / str(features)),
                retention_days=1,
                prompt_features=features,
                prompt_text=False,
            )

        setups = {"no log": None, "log": logged(False), "log + features": logged(True)}
        print(f"median ms per request at the ingress, {args.requests} requests each")
        print(f"{'prompt chars':>12} " + " ".join(f"{name:>15}" for name in setups))
        for size in (100, 2000, 32000):
            prompt = " ".join(WORDS[i % len(WORDS)] for i in range(size))[:size]
            cells = [asyncio.run(per_request_ms(s, prompt, args.requests)) for s in setups.values()]
            print(f"{size:>12} " + " ".join(f"{ms:>15.2f}" for ms in cells))


if __name__ == "__main__":
    main()
