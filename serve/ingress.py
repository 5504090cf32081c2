"""The OpenAI-compatible ingress: Ray Serve LLM's own, plus API keys, the contract and fair use.

Ray Serve LLM has no key check (ray-project/ray#55369); its maintainers point to a custom ingress
class. This one keeps the stock constructor (plus one `settings`, serve.settings) and serves only
the routes it overrides (ENDPOINTS registers no others). A chat or completions request is checked
in this order: the caller's key, hashed once (serve.access.keys); the body against the route's
contract (serve.contract.checks); the caller's budgets (serve.access.budgets); the model id,
resolved to a registry adapter version (serve.adapters). Only then is it delegated to the stock
handler, with the caller's credentials removed from what is forwarded to the engine replica, and
its answer goes back through one tap (serve.answers.tap) that makes errors public, names the
version and adapter digest that answered and, with the request log on, logs it
(serve.answers.log). `GET /health` is a readiness probe. Every refusal and every exception is
answered in OpenAI's error shape (serve.answers.errors), never with internal text.
"""

from __future__ import annotations

import asyncio

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.access.budgets import FairUse, over_budget
from serve.access.keys import identify, unauthorized
from serve.adapters import AdapterTable, AdapterWatcher
from serve.answers.errors import error_for_exception, openai_error
from serve.answers.log import AnswerLog, with_usage
from serve.answers.tap import Answerer, tapped
from serve.contract.checks import parse_body
from serve.engine_watch import EngineDown, EngineWatch, engine_is_down
from serve.ray_internal import DEFAULT_ENDPOINTS, ModelCard, ModelList, fastapi_app
from serve.settings import ServingSettings

# Only the routes KeyCheckedIngress overrides and checks, plus a readiness probe: the stock
# ingress's other routes (/tokenize, /detokenize, /v1/embeddings, /v1/score, audio) would reach
# the engine without a key. Every other path gets an OpenAI-shaped 404.
SERVED = ("models", "model_data", "completions", "chat")
ENDPOINTS = {
    **{name: DEFAULT_ENDPOINTS[name] for name in SERVED},
    "health": lambda app: app.get("/health"),
}
DOCS_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
# Never forwarded to the engine replica: the caller's credentials stay at the ingress.
CREDENTIAL_HEADERS = frozenset({b"authorization", b"proxy-authorization", b"cookie"})


def engine_request(request: Request) -> Request:
    """`request` as the engine replica may see it: the same, less the credential headers."""
    scope = dict(request.scope)
    scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() not in CREDENTIAL_HEADERS]
    return Request(scope, request.receive)


class KeyCheckedIngress(OpenAiIngress):
    def __init__(self, llm_deployments, model_cards, *, settings: ServingSettings, **kwargs):
        super().__init__(llm_deployments, model_cards, **kwargs)
        self._settings = settings
        (self._base_id,) = self._model_cards  # one base model per app
        self._adapters = AdapterWatcher(settings.adapters) if settings.adapters else None
        self._fair_use = FairUse(settings.budgets) if settings.budgets else None
        self._answers = AnswerLog(settings.answer_log) if settings.answer_log else None
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

    def _resolved(self, body) -> tuple[object, Answerer] | Response:
        """(body with the engine's model id, who answers it), or a 404 for an unknown id."""
        if body.model is None or body.model in self._model_cards:
            return body, Answerer(body.model or self._base_id, self._base_id)
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
        engine_id = route.engine_id(self._base_id)
        body = body.model_copy(update={"model": engine_id})
        return body, Answerer(engine_id, route.versioned_id, route)

    async def _generate(self, handler, request: Request, model, kind: str) -> Response:
        try:
            caller = identify(request, self._settings.key_hashes)
            if not caller.authorized:
                return unauthorized()
            checked = await parse_body(request, model, kind, self._settings.contract)
            tokens = checked.tokens
            if self._fair_use and (refusal := self._fair_use.admit(caller.budget_id, tokens)):
                return over_budget(refusal, tokens)
            resolved = self._resolved(checked.body)
            if isinstance(resolved, Response):
                return resolved
            body, answerer = resolved
            entry = None
            if self._answers:
                entry = self._answers.begin(request, checked.body, kind, caller.key_hash)
            if entry and body.stream:
                body = with_usage(body)
            if self._engine is None:
                response = await handler(body, engine_request(request))
            elif self._engine.down:
                raise EngineDown
            else:
                response = await self._engine.unless_down(handler(body, engine_request(request)))
        except Exception as exc:  # noqa: BLE001 - every failure is answered in one shape
            return error_for_exception(exc)
        return await tapped(response, answerer, entry, self._engine and self._engine.unless_down)

    async def chat(self, request: Request) -> Response:
        return await self._generate(super().chat, request, ChatCompletionRequest, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(super().completions, request, CompletionRequest, "completion")

    async def models(self, request: Request):
        if not identify(request, self._settings.key_hashes).authorized:
            return unauthorized()
        table = self._table()
        return ModelList(data=[self._card(m, table) for m in [*self._model_cards, *table.ids()]])

    async def model_data(self, model: str, request: Request):
        if not identify(request, self._settings.key_hashes).authorized:
            return unauthorized()
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
        detailed = identify(request, self._settings.key_hashes).authorized
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


async def _http_error(request, exc):
    return error_for_exception(exc)


def ingress_app():
    """The FastAPI app of the ingress: Ray Serve LLM's (its middleware and metrics), less its
    API docs (they would list routes without a key), with 404/405 in OpenAI's error shape."""
    app = fastapi_app()
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", "") not in DOCS_PATHS]
    app.openapi_url = app.docs_url = app.redoc_url = None
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return app


def ingress_deployment():
    """KeyCheckedIngress with its routes registered on `ingress_app()` (see ENDPOINTS)."""
    return make_fastapi_ingress(KeyCheckedIngress, endpoint_map=ENDPOINTS, app=ingress_app())
