"""The real ingress app over ASGI, in-process, with a FAKE engine behind it.

`ingress_client` builds the FastAPI app exactly as serve.ingress does (`ingress_app()` and its
ENDPOINTS) and binds the routes to a real `KeyCheckedIngress`; only the hop to the engine replica
(the stock ingress's `_process_llm_request`) is replaced by `FakeEngine`, which records what it
was sent and answers as told. For tests of the ingress's own behaviour (keys, contract, budgets,
error mapping) in milliseconds; tests/serve/test_endpoint.py runs the same against the real
Ray Serve + vLLM app.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
from fastapi.responses import JSONResponse

from cluster.core.credentials import hash_api_key as hash_key
from cluster.core.serve_config import LimitSettings
from serve.access.budgets import Budgets
from serve.answers.log import AnswerLogSettings
from serve.contract.fields import Bounds
from serve.ingress import ENDPOINTS, KeyCheckedIngress, ingress_app
from serve.ray_internal import ModelCard
from serve.settings import ServingSettings

KEY = "sk-fake-engine-test"
BASE = "fake-base"
MAX_LEN = 512
# Text only the server side could have written: if an answer holds it, internals leaked.
INTERNAL = re.compile(
    r"Traceback|\.py\b|\bray\.|\bvllm\b|\bpid\b|\bactor|\d+\.\d+\.\d+\.\d+|0x[0-9a-f]{6,}"
    r"|Internal exception|(?-i:[A-Z][a-z]+(?:Error|Exception)\b)",
    re.IGNORECASE,
)


class FakeEngine:
    """Stands in for the engine replica: records (body, headers), answers with `reply`."""

    def __init__(self):
        self.calls: list[tuple[object, dict[str, str]]] = []
        self.reply: Callable[[object], object] = lambda body: JSONResponse(
            {"id": "fake", "object": "chat.completion", "model": body.model, "choices": []}
        )

    async def __call__(self, body, call_method: str, raw_request=None):
        self.calls.append((body, dict(raw_request.headers)))
        answer = self.reply(body)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def ingress_client(
    keys: tuple[str, ...] = (KEY,),
    limits: LimitSettings | None = None,
    budgets: Budgets | None = None,
    answer_log: AnswerLogSettings | None = None,
) -> tuple[httpx.AsyncClient, FakeEngine]:
    card = ModelCard(id=BASE, object="model", owned_by="fedforge", permission=[], metadata={})
    settings = ServingSettings(
        key_hashes=tuple(hash_key(k) for k in keys),
        contract=Bounds(limits or LimitSettings(), MAX_LEN),
        budgets=budgets,
        answer_log=answer_log,
    )
    ingress = KeyCheckedIngress({BASE: None}, {BASE: card}, settings=settings)
    engine = FakeEngine()
    ingress._process_llm_request = engine
    app = ingress_app()
    for name, route in ENDPOINTS.items():
        route(app)(getattr(ingress, name))
    transport = httpx.ASGITransport(app, client=("203.0.113.7", 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://ingress"), engine


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(response: httpx.Response, sent: str = "") -> dict:
    """The answer is OpenAI's error shape with no internal text (beyond what was sent)."""
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    leaked = [m for m in INTERNAL.findall(response.text) if m not in sent]
    assert not leaked, (leaked, response.text)
    return error


def served_routes() -> list[tuple[str, str]]:
    """(method, path) of every route the ingress app serves, read from the route table of an
    app built as serve.ingress builds it (the served one lives in the ingress replica)."""
    app = ingress_app()
    for route in ENDPOINTS.values():
        route(app)(lambda: None)
    return sorted((m, r.path) for r in app.routes for m in getattr(r, "methods", None) or ())


# The stock ingress's other routes and FastAPI's docs: none may be served, key or not.
NOT_SERVED = [
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/score"),
    ("POST", "/v1/audio/transcriptions"),
    ("GET", "/docs"),
    ("GET", "/redoc"),
    ("GET", "/openapi.json"),
]
