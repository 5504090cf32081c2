"""OpenAI-shaped error responses, and parsing request bodies into 400s instead of 500s.

Stock Ray Serve LLM lets FastAPI parse bodies with vLLM's protocol models, whose validators raise
a raw TypeError on shapes like `"messages": 3.7`; that escapes as a 500. Bodies are parsed here
instead: malformed JSON, wrong shapes and out-of-range limits get a 400 naming the parameter.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


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


def _check_limit(raw: dict, name: str, upper: int) -> None:
    value = raw.get(name)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= upper:
        raise BadRequest(f"'{name}' must be an integer between 1 and {upper}, got {value!r}", name)


def _check_chat(raw: dict, max_model_len: int) -> None:
    messages = raw.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(
            "'messages' must be a non-empty list of {role, content} objects", "messages"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(
                f"'messages[{i}]' must be an object with a string 'role'", f"messages[{i}]"
            )
    for name in ("max_tokens", "max_completion_tokens"):
        _check_limit(raw, name, max_model_len)


def _check_completion(raw: dict, max_model_len: int) -> None:
    prompt = raw.get("prompt")
    if not isinstance(prompt, str | list) or not prompt:
        raise BadRequest("'prompt' must be a non-empty string or list", "prompt")
    _check_limit(raw, "max_tokens", max_model_len)


CHECKS = {"chat": _check_chat, "completion": _check_completion}


async def parse_body(
    request: Request, model: type[BaseModel], kind: str, max_model_len: int
) -> Any:
    """The request body as `model`, or BadRequest with an OpenAI-style message."""
    try:
        raw = await request.json()
    except ValueError:
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(raw, dict):
        raise BadRequest("the request body must be a JSON object")
    CHECKS[kind](raw, max_model_len)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise BadRequest(f"invalid '{param}': {first['msg']}", param) from None
    except (TypeError, ValueError) as exc:  # raised raw by some of vLLM's validators
        raise BadRequest(f"invalid request: {exc}") from None
