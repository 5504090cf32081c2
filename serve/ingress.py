"""The OpenAI-compatible ingress: Ray Serve LLM's own, plus API keys and request checks.

Ray Serve LLM has no key check (ray-project/ray#55369); its maintainers point to a custom ingress
class. This one keeps the stock constructor, checks `Authorization: Bearer` on every model route,
parses bodies itself so bad ones get a 400 (see serve.request_checks), resolves registry adapter
ids (see serve.adapters), then delegates to the stock handlers. `GET /health` is a readiness
probe. Every refusal has OpenAI's error shape (serve.errors).
"""

from __future__ import annotations

import asyncio
import math

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from serve.adapters import AdapterSource, AdapterTable, AdapterWatcher
from serve.api_keys import bearer_hash, is_authorized
from serve.errors import openai_error
from serve.rate_limit import RateLimiter
from serve.ray_internal import ModelCard, ModelList
from serve.relabel import relabel
from serve.request_checks import BadRequest, parse_body


class KeyCheckedIngress(OpenAiIngress):
    def __init__(
        self,
        llm_deployments,
        model_cards,
        *,
        lora_paths=None,
        api_key_hashes=(),
        max_model_len=2048,
        adapter_source: AdapterSource | None = None,
        rate_limit: tuple[float, int] | None = None,
        **kwargs,
    ):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        self._key_hashes = list(api_key_hashes)
        self._max_model_len = max_model_len
        (self._base_id,) = self._model_cards  # one base model per app
        self._adapters = AdapterWatcher(adapter_source) if adapter_source else None
        self._limiter = RateLimiter(*rate_limit) if rate_limit else None

    def _table(self) -> AdapterTable:
        """The current snapshot; take it once per request so one answer sees one table."""
        return self._adapters.table if self._adapters else AdapterTable()

    def _card(self, model: str, table: AdapterTable) -> ModelCard | None:
        """The base model's card, or one for an adapter id (None when unknown)."""
        if model in self._model_cards:
            return self._model_cards[model]
        route = table.resolve(model)
        if route is None:
            return None
        metadata = {
            "base_model_id": self._base_id,
            "adapter": route.name,
            "version": route.version,
            "resolves_to": route.versioned_id,
        }
        owner = self._model_cards[self._base_id].owned_by
        return ModelCard(id=model, object="model", owned_by=owner, permission=[], metadata=metadata)

    def _refusal(self, request: Request) -> Response | None:
        if is_authorized(request.headers.get("authorization"), self._key_hashes):
            return None
        return openai_error(
            401,
            "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
            code="invalid_api_key",
        )

    def _over_rate_limit(self, request: Request) -> Response | None:
        if self._limiter is None:
            return None
        caller = bearer_hash(request.headers.get("authorization")) or "anonymous"
        wait_s = self._limiter.wait_s(caller)
        if not wait_s:
            return None
        retry_after = math.ceil(wait_s)
        return openai_error(
            429,
            f"Rate limit reached for this API key ({self._limiter.rate * 60:g} requests per "
            f"minute); retry after {retry_after} s.",
            type_="requests",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry_after)},
        )

    async def _parsed(self, request: Request, model, kind: str):
        """(body with the engine's model id, id that answers), or the error response instead."""
        try:
            body = await parse_body(request, model, kind, self._max_model_len)
        except BadRequest as exc:
            return openai_error(400, exc.message, param=exc.param)
        if body.model is None or body.model in self._model_cards:
            return body, self._base_id
        table = self._table()
        route = table.resolve(body.model)
        if route is None:
            available = ", ".join([self._base_id, *table.ids()])
            return openai_error(
                404,
                f"The model '{body.model}' does not exist. Available: {available}.",
                param="model",
                code="model_not_found",
            )
        # Resolved here, once: the whole request runs on this version even if `production`
        # moves while it streams.
        body = body.model_copy(update={"model": route.engine_id(self._base_id)})
        return body, route.versioned_id

    async def _delegate(self, handler, body, request: Request) -> Response:
        try:
            return await handler(body, request)
        except BackPressureError as exc:  # the engine replicas' queues are full
            retry_after = str(max(1, round(exc.retry_after_s or 1)))
            return openai_error(
                503,
                "The server is at capacity; retry after a short wait.",
                type_="server_overloaded",
                code="queue_full",
                headers={"Retry-After": retry_after},
            )

    async def _generate(self, handler, request: Request, model, kind: str) -> Response:
        if refusal := self._refusal(request) or self._over_rate_limit(request):
            return refusal
        parsed = await self._parsed(request, model, kind)
        if isinstance(parsed, Response):
            return parsed
        body, answering_id = parsed
        response = await self._delegate(handler, body, request)
        return relabel(response, body.model or self._base_id, answering_id)

    async def chat(self, request: Request) -> Response:
        return await self._generate(super().chat, request, ChatCompletionRequest, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(super().completions, request, CompletionRequest, "completion")

    async def models(self, request: Request):
        if refusal := self._refusal(request):
            return refusal
        table = self._table()
        return ModelList(data=[self._card(m, table) for m in [*self._model_cards, *table.ids()]])

    async def model_data(self, model: str, request: Request):
        if refusal := self._refusal(request):
            return refusal
        card = self._card(model, self._table())
        if card is None:
            return openai_error(
                404, f"The model '{model}' does not exist.", param="model", code="model_not_found"
            )
        return card

    async def health(self) -> Response:
        """200 once every deployment of this app has a running replica, else 503 naming the
        ones that do not: the ingress answers (and lists models) well before the engine
        replica has loaded the model. No key needed, like a load balancer's or Kubernetes'
        probe. Read from Serve's controller, so a busy engine still reads as ready."""
        app_name = serve.get_replica_context().app_name
        status = await asyncio.to_thread(serve.status)
        deployments = status.applications[app_name].deployments
        waiting = sorted(
            name for name, d in deployments.items() if not d.replica_states.get("RUNNING")
        )
        if waiting:
            return openai_error(
                503,
                f"Not ready: no running replica yet for {', '.join(waiting)}.",
                type_="service_unavailable",
                code="not_ready",
                headers={"Retry-After": "5"},
            )
        return JSONResponse({"status": "ok", "deployments": sorted(deployments)})
