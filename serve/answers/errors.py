"""The one error shape of the endpoint: OpenAI's `{"error": {message, type, param, code}}`.

Every refusal the ingress makes is built by `openai_error`, and every exception on the way to or
from the engine is turned into one by `error_for_exception`, the one place that maps them; the
stream tap (serve.answers.tap) hands the engine's error events here. What callers read never
holds internal text (pids, addresses, actor ids, class or module names, file paths). The full
exception is logged on the ingress replica, with an id the caller also gets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from serve.contract.fields import BadRequest
from serve.engine_watch import EngineDown
from serve.ray_internal import OpenAIHTTPException

log = logging.getLogger(__name__)

# What only the server should see. Checked on any text that did not come from fedforge itself.
INTERNAL_TEXT = re.compile(
    r"\.py\b|Traceback|File \"|(?:/[\w.-]+){2,}"  # source and file paths
    r"|\b(?:ray|vllm|torch|pydantic|starlette|fastapi|uvicorn|serve|cluster|builtins)\.\w"
    r"|(?-i:\b[A-Z][a-z0-9]+[A-Z][a-z0-9]+\w*)"  # CamelCase class names (RayActorError, ...)
    r"|\b\d{1,3}(?:\.\d{1,3}){3}\b|\[[0-9a-f:]+\]"  # IPv4 and bracketed IPv6 addresses
    r"|0x[0-9a-fA-F]{4,}|\bpid\b|\bactor\b|\bnode_id\b|\bworker_id\b"
    r"|Internal exception|original exception",
    re.IGNORECASE,
)
RAY_WRAPPING = re.compile(r"^Message: |,? ?\(Request ID: [^)]*\)|, Internal exception: .*$", re.S)
GENERIC = {
    400: "The request could not be processed; check its parameters.",
    404: "Not found.",
    405: "Method not allowed on this route.",
    408: "The request timed out on the server.",
    413: "The request body is too large.",
    429: "Too many requests; retry later.",
}


def openai_error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def public_text(text: str | None, fallback: str) -> str:
    """`text` without Ray's wrapping when it holds nothing internal, else `fallback`."""
    if not isinstance(text, str):
        return fallback
    text = RAY_WRAPPING.sub("", text).strip()
    if not text or len(text) > 500 or INTERNAL_TEXT.search(text):
        return fallback
    return text


def _server_error(exc: BaseException) -> JSONResponse:
    incident = uuid.uuid4().hex[:12]
    log.error("request failed (incident %s)", incident, exc_info=exc)
    return openai_error(
        500,
        f"The server failed to process the request (incident {incident}).",
        type_="server_error",
        code="internal_error",
    )


def _unavailable(message: str, code: str, retry_after_s: float | None = None) -> JSONResponse:
    retry_after = str(max(1, round(retry_after_s or 1)))
    return openai_error(
        503, message, type_="server_overloaded", code=code, headers={"Retry-After": retry_after}
    )


def error_for_exception(exc: BaseException) -> JSONResponse:
    """The OpenAI-shaped answer to any exception raised while handling a request."""
    if isinstance(exc, BadRequest):
        return openai_error(exc.status, exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, BackPressureError):  # the engine replicas' queues are full
        return _unavailable(
            "The server is at capacity; retry after a short wait.", "queue_full", exc.retry_after_s
        )
    # An engine replica died, is restarting, or none is up yet.
    if isinstance(
        exc, RayActorError | ReplicaUnavailableError | DeploymentUnavailableError | EngineDown
    ):
        return _unavailable("The model server is restarting; retry shortly.", "engine_unavailable")
    if isinstance(exc, asyncio.TimeoutError):
        return openai_error(408, GENERIC[408], type_="timeout", code="timeout")
    if isinstance(exc, ClientDisconnect):
        return openai_error(400, "The client closed the connection.", code="client_disconnected")
    status, text = None, None
    if isinstance(exc, OpenAIHTTPException):  # an engine refusal, re-raised by Ray's ingress
        status, text = exc.status_code, exc.message
    elif isinstance(exc, HTTPException | StarletteHTTPException):
        status, text = exc.status_code, exc.detail
    if not isinstance(status, int) or not 400 <= status < 500:
        return _server_error(exc)
    fallback = GENERIC.get(status, GENERIC[400])
    code = {404: "not_found", 405: "method_not_allowed", 408: "timeout"}.get(status)
    return openai_error(status, public_text(text, fallback), code=code)


def _error_event(error: dict) -> str:
    """An error event, and the end of the stream after it."""
    return f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n"


def engine_error(event: dict) -> tuple[int, str]:
    """(status, public message) of an engine error event (`{"error": ...}`, parsed)."""
    error = event["error"] if isinstance(event.get("error"), dict) else {}
    message, status = error.get("message"), error.get("code")
    if not isinstance(status, int) or not 400 <= status < 500:
        return 500, "The server failed to finish the answer."
    return status, public_text(message, GENERIC.get(status, GENERIC[400]))


def engine_refusal(event: dict, text: str) -> JSONResponse:
    """An engine error as a stream's first event (vLLM streams its own validation errors, e.g. a
    token id out of the vocabulary, after a 200) as a plain OpenAI error with its status."""
    status, message = engine_error(event)
    if status >= 500:
        return _server_error(RuntimeError(f"engine error event: {text[:2000]}"))
    return openai_error(status, message)


def public_error_event(event: dict) -> str:
    """An engine error event met mid-stream, without internal text; the stream ends with it."""
    status, message = engine_error(event)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _error_event({"message": message, "type": kind, "param": None, "code": status})


def failure_event(exc: BaseException) -> str:
    """How a stream the engine failed mid-way ends: an error event, since the status line is
    already sent (not a cut connection)."""
    incident = uuid.uuid4().hex[:12]
    log.error("stream failed (incident %s)", incident, exc_info=exc)
    message = f"The server failed to finish the answer (incident {incident})."
    return _error_event({"message": message, "type": "server_error", "param": None, "code": 500})
