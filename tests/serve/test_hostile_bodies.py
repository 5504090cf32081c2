"""Property-based: a few hundred generated hostile bodies on chat and completions, through the
real ingress app over ASGI (fake engine, see tests/serve/fake_engine.py): never a 5xx, every
refusal in OpenAI's error shape without internal text, and nothing the contract refuses reaches
the engine. The real endpoint gets the same strategies in tests/serve/test_endpoint.py and, for
thousands of cases, scripts/fuzz_serve.py."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from tests.serve.fake_engine import BASE, assert_openai_error, auth, ingress_client
from tests.serve.hostile import bodies

ROUTES = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
PROTOCOL = {"chat": ChatCompletionRequest, "completion": CompletionRequest}
CASES = 250  # per route: ~2 s each on 2 cores


@pytest.fixture(scope="module")
def ingress():
    """One app and one event loop for every case (building them per case would cost more than
    the cases)."""
    loop = asyncio.new_event_loop()
    client, engine = ingress_client()
    yield loop, client, engine
    loop.run_until_complete(client.aclose())
    loop.close()


def check(ingress, kind: str, body: bytes) -> None:
    loop, client, engine = ingress
    engine.calls.clear()
    headers = {**auth(), "Content-Type": "application/json"}
    response = loop.run_until_complete(client.post(ROUTES[kind], content=body, headers=headers))
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_openai_error(response, sent=body.decode(errors="replace"))
        assert not engine.calls  # refused at the ingress: the engine never saw it
    else:
        assert response.status_code == 200
        ((forwarded, headers),) = engine.calls
        assert isinstance(forwarded, PROTOCOL[kind]) and "authorization" not in headers


SETTINGS = settings(
    max_examples=CASES,
    deadline=None,
    derandomize=True,  # the same cases on every run and machine
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


@SETTINGS
@given(body=bodies(BASE, "chat"))
def test_hostile_chat_bodies_get_no_5xx_and_only_openai_errors(ingress, body):
    check(ingress, "chat", body)


@SETTINGS
@given(body=bodies(BASE, "completion"))
def test_hostile_completion_bodies_get_no_5xx_and_only_openai_errors(ingress, body):
    check(ingress, "completion", body)
