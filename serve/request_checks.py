"""Request bodies parsed into 400s instead of 500s.

Stock Ray Serve LLM lets FastAPI parse bodies with vLLM's protocol models, whose validators raise
a raw TypeError on shapes like `"messages": 3.7`; that escapes as a 500. Bodies are parsed here
instead: malformed JSON, wrong shapes and out-of-range limits raise `BadRequest` naming the
parameter, which the ingress answers in the error shape of serve.errors.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


def check_limit(raw: dict, name: str, upper: int) -> None:
    value = raw.get(name)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= upper:
        raise BadRequest(f"'{name}' must be an integer between 1 and {upper}, got {value!r}", name)


def check_chat(raw: dict, max_model_len: int) -> None:
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
        check_limit(raw, name, max_model_len)


def check_completion(raw: dict, max_model_len: int) -> None:
    prompt = raw.get("prompt")
    if not isinstance(prompt, str | list) or not prompt:
        raise BadRequest("'prompt' must be a non-empty string or list", "prompt")
    check_limit(raw, "max_tokens", max_model_len)


CHECKS = {"chat": check_chat, "completion": check_completion}


def validate_body(raw: bytes, model: type[BaseModel], kind: str, max_model_len: int) -> Any:
    """The raw body as `model` (a vLLM protocol model), or BadRequest with an OpenAI message."""
    try:
        decoded = json.loads(raw)
    except ValueError:  # also UnicodeDecodeError
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(decoded, dict):
        raise BadRequest("the request body must be a JSON object")
    CHECKS[kind](decoded, max_model_len)
    try:
        return model.model_validate(decoded)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise BadRequest(f"invalid '{param}': {first['msg']}", param) from None
    except (TypeError, ValueError) as exc:  # raised raw by some of vLLM's validators
        raise BadRequest(f"invalid request: {exc}") from None


async def parse_body(
    request: Request, model: type[BaseModel], kind: str, max_model_len: int
) -> Any:
    """The request's body as `model`, or BadRequest (see `validate_body`)."""
    return validate_body(await request.body(), model, kind, max_model_len)
