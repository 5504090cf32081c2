"""The ingress over ASGI with a fake engine: routes behind the key, credentials kept at the
ingress, engine failures in OpenAI's error shape without internals, and fair use."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.responses import JSONResponse, StreamingResponse
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from cluster.core.credentials import hash_api_key as hash_key
from serve.access import keys
from serve.access.budgets import Budgets
from serve.answers.log import AnswerLogSettings
from serve.engine_watch import EngineDown
from serve.ray_internal import OpenAIHTTPException
from tests.serve.fake_engine import (
    BASE,
    NOT_SERVED,
    assert_openai_error,
    auth,
    ingress_client,
    served_routes,
)

CHAT = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def run(coro):
    return asyncio.run(coro)


def test_the_app_serves_only_the_checked_routes_and_no_docs():
    paths = {path for _, path in served_routes()}
    assert paths == {
        "/v1/models",
        "/v1/models/{model:path}",
        "/v1/completions",
        "/v1/chat/completions",
        "/health",
    }


def test_every_route_but_health_needs_a_key_and_the_rest_is_not_served():
    async def go():
        client, engine = ingress_client()
        async with client:
            for method, path in served_routes():
                if path == "/health":
                    continue
                response = await client.request(method, path.replace("{model:path}", BASE))
                assert response.status_code == 401, (method, path)
                assert assert_openai_error(response)["code"] == "invalid_api_key"
            for method, path in NOT_SERVED:
                for headers in ({}, auth()):
                    response = await client.request(method, path, headers=headers, json={})
                    assert response.status_code == 404, (method, path)
                    assert_openai_error(response)
        assert not engine.calls

    run(go())


def test_credentials_are_not_forwarded_to_the_engine():
    async def go():
        client, engine = ingress_client()
        async with client:
            headers = {**auth(), "Cookie": "session=secret", "X-Trace": "t-1"}
            response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert response.status_code == 200
        ((_, forwarded),) = engine.calls
        assert "authorization" not in forwarded and "cookie" not in forwarded
        assert forwarded["x-trace"] == "t-1"

    run(go())


CONTEXT_MESSAGE = (
    "This model's maximum context length is 512 tokens. However, you requested 600 tokens."
)


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (OpenAIHTTPException(400, CONTEXT_MESSAGE, type="BadRequestError"), 400, None),
        (
            OpenAIHTTPException(
                400,
                "Message: bad, Internal exception: ray.llm._internal.serve.core (pid=4242, "
                'ip=10.1.2.3) File "/usr/lib/python3.11/site-packages/vllm/x.py"',
            ),
            400,
            None,
        ),
        (OpenAIHTTPException(500, "engine died at 0x7f56825bd300"), 500, "internal_error"),
        (
            RuntimeError("boom in /work/main/serve/engine.py, pid 12, 127.0.0.1:8000"),
            500,
            "internal_error",
        ),
        (RecursionError("maximum recursion depth exceeded"), 500, "internal_error"),
        (BackPressureError(num_queued_requests=3, max_queued_requests=2), 503, "queue_full"),
        (ActorDiedError(), 503, "engine_unavailable"),
        (EngineDown(), 503, "engine_unavailable"),
        (TimeoutError(), 408, "timeout"),
    ],
    ids=[
        "engine-400",
        "engine-400-internal",
        "engine-500",
        "raw",
        "recursion",
        "queue",
        "died",
        "engine-down",
        "timeout",
    ],
)
def test_every_engine_failure_is_an_openai_error_without_internals(failure, status, code):
    async def go():
        client, engine = ingress_client()
        engine.reply = lambda body: failure
        async with client:
            return await client.post("/v1/chat/completions", json=CHAT, headers=auth())

    response = run(go())
    assert response.status_code == status
    error = assert_openai_error(response)
    assert error["code"] == code
    if status == 503:
        assert int(response.headers["Retry-After"]) >= 1
    if "maximum context length" in str(failure):
        assert error["message"] == CONTEXT_MESSAGE  # a useful engine message passes as it is


def test_a_stream_that_fails_ends_with_an_error_event_without_internals():
    async def chunks(fail: bool):
        yield 'data: {"choices":[{"text":"a"}]}\n\n'
        if fail:
            raise RuntimeError("engine core died (pid=77) at /opt/vllm/core.py")
        yield 'data: {"error":{"message":"ray.llm._internal boom at 10.0.0.9","code":500}}\n\n'

    async def go(fail: bool):
        client, engine = ingress_client()
        engine.reply = lambda body: StreamingResponse(chunks(fail), media_type="text/event-stream")
        async with client:
            return await client.post(
                "/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth()
            )

    for fail in (True, False):
        text = run(go(fail)).text
        events = [line for line in text.splitlines() if line]
        assert events[0] == 'data: {"choices":[{"text":"a"}]}'
        assert '"error"' in events[1] and "server_error" in events[1]
        assert events[-1] == "data: [DONE]"
        for marker in ("pid", "10.0.0.9", "ray.llm", ".py"):
            assert marker not in text


def budgets(**given) -> Budgets:
    """The ingress' fair-use settings: nothing limited but what a test gives."""
    defaults = {"requests_per_minute": None, "request_burst": 1, "tokens_per_minute": None}
    return Budgets(**{**defaults, "max_callers": 100, **given})


def test_requests_and_tokens_get_429_with_retry_after():
    limits = budgets(requests_per_minute=60, request_burst=2)

    async def go():
        client, _ = ingress_client(budgets=limits)
        async with client:
            return [
                await client.post("/v1/chat/completions", json=CHAT, headers=auth())
                for _ in range(3)
            ]

    codes = [r.status_code for r in run(go())]
    assert codes == [200, 200, 429]
    refused = run(go())[2]
    assert refused.headers["Retry-After"] == "1"
    assert assert_openai_error(refused)["code"] == "rate_limit_exceeded"


def test_token_budget_counts_max_tokens_times_n():
    limits = budgets(tokens_per_minute=100)

    async def go():
        client, _ = ingress_client(budgets=limits)
        async with client:
            big = {**CHAT, "max_tokens": 30, "n": 2}  # 60 + 1 prompt token
            first = await client.post("/v1/chat/completions", json=big, headers=auth())
            second = await client.post("/v1/chat/completions", json=big, headers=auth())
            never = await client.post(
                "/v1/chat/completions", json={**CHAT, "max_tokens": 101}, headers=auth()
            )
            return first, second, never

    first, second, never = run(go())
    assert first.status_code == 200 and second.status_code == 429
    assert second.json()["error"]["type"] == "tokens"
    assert 1 <= int(second.headers["Retry-After"]) <= 60
    assert never.status_code == 400 and never.json()["error"]["code"] == "request_over_budget"


def test_without_keys_budgets_are_per_client_address_not_per_bearer_string():
    limits = budgets(requests_per_minute=60, request_burst=2)

    async def go():
        client, _ = ingress_client(keys=(), budgets=limits)
        async with client:
            return [
                (
                    await client.post(
                        "/v1/chat/completions", json=CHAT, headers=auth(f"made-up-{i}")
                    )
                ).status_code
                for i in range(3)
            ]

    assert run(go()) == [200, 200, 429]


def test_a_good_answer_passes_unchanged():
    async def go():
        client, engine = ingress_client()
        engine.reply = lambda body: JSONResponse({"id": "x", "model": body.model, "choices": []})
        async with client:
            return await client.post("/v1/chat/completions", json=CHAT, headers=auth())

    response = run(go())
    assert response.status_code == 200 and response.json()["model"] == BASE


@pytest.mark.parametrize(
    ("event", "status", "message"),
    [
        ({"message": "Token id 49152 is out of vocabulary", "code": 400}, 400, "out of vocabulary"),
        ({"message": "failed in ray.llm._internal at 10.0.0.9", "code": 400}, 400, "check its"),
        ({"message": "engine crashed", "code": 500}, 500, "incident"),
    ],
    ids=["useful", "internal", "server"],
)
def test_an_engine_refusal_as_the_first_stream_event_becomes_a_plain_error(event, status, message):
    async def chunks():
        error = {**event, "type": "BadRequestError", "param": None}
        yield f"data: {json.dumps({'error': error})}\n\n"
        yield "data: [DONE]\n\n"

    async def go():
        client, engine = ingress_client()
        engine.reply = lambda body: StreamingResponse(chunks(), media_type="text/event-stream")
        async with client:
            return await client.post(
                "/v1/completions",
                json={"model": BASE, "prompt": [49152], "max_tokens": 1, "stream": True},
                headers=auth(),
            )

    response = run(go())
    assert response.status_code == status
    assert message in assert_openai_error(response)["message"]


def test_the_key_is_hashed_once_per_request(tmp_path, monkeypatch):
    """The key check, the caller's budgets and the answer log all read one hash."""
    hashed = []
    monkeypatch.setattr(keys, "hash_api_key", lambda key: hashed.append(key) or hash_key(key))
    log = AnswerLogSettings(str(tmp_path), 1, prompt_features=False, prompt_text=False)

    async def go():
        client, _ = ingress_client(budgets=budgets(requests_per_minute=60), answer_log=log)
        async with client:
            return await client.post("/v1/chat/completions", json=CHAT, headers=auth())

    assert run(go()).status_code == 200
    assert len(hashed) == 1
