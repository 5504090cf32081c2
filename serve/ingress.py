"""The OpenAI-compatible ingress: Ray Serve LLM's own, plus API keys and request checks.

Ray Serve LLM has no key check (ray-project/ray#55369); its maintainers point to a custom ingress
class. This one keeps the stock constructor, checks `Authorization: Bearer` on every model route,
parses bodies itself so bad ones get a 400 (see serve.errors), then delegates to the stock
handlers.
"""

from __future__ import annotations

from fastapi import Request, Response
from ray.llm._internal.common.utils.lora_utils import get_base_model_id
from ray.serve.exceptions import BackPressureError
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from serve.api_keys import is_authorized
from serve.errors import BadRequest, openai_error, parse_body


class KeyCheckedIngress(OpenAiIngress):
    def __init__(
        self,
        llm_deployments,
        model_cards,
        *,
        lora_paths=None,
        api_key_hashes=(),
        max_model_len=2048,
        **kwargs,
    ):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        self._key_hashes = list(api_key_hashes)
        self._max_model_len = max_model_len

    def _refusal(self, request: Request) -> Response | None:
        if is_authorized(request.headers.get("authorization"), self._key_hashes):
            return None
        return openai_error(
            401,
            "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
            code="invalid_api_key",
        )

    async def _parsed(self, request: Request, model, kind: str):
        """The parsed body, or the error response to send instead."""
        try:
            body = await parse_body(request, model, kind, self._max_model_len)
        except BadRequest as exc:
            return openai_error(400, exc.message, param=exc.param)
        known = (
            body.model is None
            or body.model in self._model_cards
            or (get_base_model_id(body.model) in self._lora_paths)
        )
        if not known:
            available = ", ".join(sorted(self._model_cards))
            return openai_error(
                404,
                f"The model '{body.model}' does not exist. Available: {available}.",
                param="model",
                code="model_not_found",
            )
        return body

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

    async def chat(self, request: Request) -> Response:
        if refusal := self._refusal(request):
            return refusal
        body = await self._parsed(request, ChatCompletionRequest, "chat")
        if isinstance(body, Response):
            return body
        return await self._delegate(super().chat, body, request)

    async def completions(self, request: Request) -> Response:
        if refusal := self._refusal(request):
            return refusal
        body = await self._parsed(request, CompletionRequest, "completion")
        if isinstance(body, Response):
            return body
        return await self._delegate(super().completions, body, request)

    async def models(self, request: Request):
        return self._refusal(request) or await super().models()

    async def model_data(self, model: str, request: Request):
        return self._refusal(request) or await super().model_data(model)
