"""The OpenAI-compatible ingress: Ray Serve LLM's own, plus API keys, the contract and fair use.

Ray Serve LLM has no key check (ray-project/ray#55369); its maintainers point to a custom ingress
class. This one keeps the stock constructor and serves only the routes it overrides (serve.app
registers no others): each checks `Authorization: Bearer` first, then the body against the
route's contract (serve.contract.checks), then the caller's budgets (serve.access.budgets), resolves
registry adapter ids (serve.adapters), and only then delegates to the stock handler, with the
caller's credentials removed from what is forwarded to the engine replica. Answers name the
version and adapter digest that produced them (serve.relabel) and, with the request log on, are
logged (serve.answers.log). `GET /health` is a readiness probe. Every refusal and every exception
is answered in OpenAI's error shape (serve.answers.errors), never with internal text.
"""

from __future__ import annotations

import asyncio
import math

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from cluster.core.serve_config import LimitSettings
from serve.access.budgets import FairUse
from serve.access.keys import bearer_hash, is_authorized
from serve.adapters import AdapterRoute, AdapterSource, AdapterTable, AdapterWatcher
from serve.answers.errors import checked_stream, error_for_exception, openai_error
from serve.answers.log import AnswerLog, AnswerLogSettings, with_usage
from serve.contract.checks import Bounds, parse_body
from serve.engine_watch import EngineDown, EngineWatch, engine_is_down
from serve.ray_internal import ModelCard, ModelList
from serve.relabel import relabel

# Never forwarded to the engine replica: the caller's credentials stay at the ingress.
CREDENTIAL_HEADERS = frozenset({b"authorization", b"proxy-authorization", b"cookie"})


def engine_request(request: Request) -> Request:
    """`request` as the engine replica may see it: the same, less the credential headers."""
    scope = dict(request.scope)
    scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() not in CREDENTIAL_HEADERS]
    return Request(scope, request.receive)


class KeyCheckedIngress(OpenAiIngress):
    def __init__(
        self,
        llm_deployments,
        model_cards,
        *,
        lora_paths=None,
        api_key_hashes=(),
        max_model_len=2048,
        limits: LimitSettings | None = None,
        adapter_source: AdapterSource | None = None,
        fair_use: dict | None = None,
        answer_log: AnswerLogSettings | None = None,
        **kwargs,
    ):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        self._key_hashes = list(api_key_hashes)
        self._bounds = Bounds(limits or LimitSettings(), max_model_len)
        (self._base_id,) = self._model_cards  # one base model per app
        self._adapters = AdapterWatcher(adapter_source) if adapter_source else None
        self._fair_use = FairUse(**fair_use) if fair_use else None
        self._answers = AnswerLog(answer_log) if answer_log else None
        self._engine = self._engine_watch()

    @staticmethod
    def _engine_watch() -> EngineWatch | None:
        """A watch on the engine's health, when this runs as a Serve replica (not in tests that
        build the ingress alone)."""
        try:
            context = serve.get_replica_context()
        except Exception:  # noqa: BLE001 - Serve raises when not inside a replica
            return None
        app, ingress = context.app_name, context.deployment
        return EngineWatch(lambda: engine_is_down(serve.status, app, ingress))

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
            "data_privacy": {
                data: {"dp": private, "epsilon": epsilon, "budget_epsilon": budget}
                for data, epsilon, private, budget in route.data_privacy
            },
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

    def _caller(self, request: Request) -> str:
        """Whose budget a request spends: its key's, or with no keys configured its address's
        (so made-up bearer strings cannot open fresh budgets)."""
        if self._key_hashes:
            return bearer_hash(request.headers.get("authorization")) or "anonymous"
        return "addr:" + (request.client.host if request.client else "unknown")

    def _over_budget(self, request: Request, tokens: int) -> Response | None:
        if self._fair_use is None:
            return None
        refusal = self._fair_use.admit(self._caller(request), tokens)
        if refusal is None:
            return None
        unit = "requests" if refusal.limit == "requests" else "tokens"
        if math.isinf(refusal.wait_s):
            return openai_error(
                400,
                f"This request may use about {tokens} tokens, more than the "
                f"{refusal.per_minute:g} tokens per minute allowed; lower max_tokens or n.",
                param="max_tokens",
                code="request_over_budget",
            )
        retry_after = math.ceil(refusal.wait_s)
        return openai_error(
            429,
            f"Rate limit reached ({refusal.per_minute:g} {unit} per minute); "
            f"retry after {retry_after} s.",
            type_=unit,
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry_after)},
        )

    def _resolved(self, body) -> tuple[object, str, AdapterRoute | None] | Response:
        """(body with the engine's model id, id that answers, its adapter route), or a 404 for
        an unknown id."""
        if body.model is None or body.model in self._model_cards:
            return body, self._base_id, None
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
        return body, route.versioned_id, route

    async def _generate(self, handler, request: Request, model, kind: str) -> Response:
        try:
            if refusal := self._refusal(request):
                return refusal
            checked = await parse_body(request, model, kind, self._bounds)
            if refusal := self._over_budget(request, checked.tokens):
                return refusal
            resolved = self._resolved(checked.body)
            if isinstance(resolved, Response):
                return resolved
            body, answering_id, route = resolved
            answer = self._answers.begin(request, checked.body, kind) if self._answers else None
            if answer and body.stream:
                body = with_usage(body)
            if self._engine is None:
                response = await handler(body, engine_request(request))
            elif self._engine.down:
                raise EngineDown
            else:
                response = await self._engine.unless_down(handler(body, engine_request(request)))
        except Exception as exc:  # noqa: BLE001 - every failure is answered in one shape
            return error_for_exception(exc)
        if isinstance(response, StreamingResponse):
            response = await checked_stream(response, self._engine and self._engine.unless_down)
        digest = route.adapter_sha256 if route else ""
        response = relabel(response, body.model or self._base_id, answering_id, digest)
        return answer.logged(response, answering_id, route) if answer else response

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
                404,
                f"The model '{model[:256]}' does not exist.",
                param="model",
                code="model_not_found",
            )
        return card

    async def health(self, request: Request) -> Response:
        """200 once every deployment of this app has a running replica, else 503: the ingress
        answers (and lists models) well before the engine replica has loaded the model. No key
        needed, like a load balancer's or Kubernetes' probe; the deployment names, which tell
        how the app is built, only to a caller with a valid key. Read from Serve's controller,
        so a busy engine still reads as ready."""
        try:
            app_name = serve.get_replica_context().app_name
            status = await asyncio.to_thread(serve.status)
            deployments = status.applications[app_name].deployments
        except Exception as exc:  # noqa: BLE001 - answered in the one error shape
            return error_for_exception(exc)
        detailed = is_authorized(request.headers.get("authorization"), self._key_hashes)
        waiting = sorted(
            name for name, d in deployments.items() if not d.replica_states.get("RUNNING")
        )
        if waiting:
            which = f" for {', '.join(waiting)}" if detailed else ""
            return openai_error(
                503,
                f"Not ready: no running replica yet{which}.",
                type_="service_unavailable",
                code="not_ready",
                headers={"Retry-After": "5"},
            )
        body = {"status": "ok"}
        if detailed:
            body["deployments"] = sorted(deployments)
        return JSONResponse(body)
