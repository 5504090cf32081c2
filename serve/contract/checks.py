"""Request bodies read, bounded and parsed at the ingress, before anything reaches the engine.

Stock Ray Serve LLM lets FastAPI parse bodies with vLLM's protocol models: no size cap, Python's
RecursionError on deep JSON and raw TypeErrors from validators escape as 500s, and unknown fields
are silently dropped. Here a body is read up to `limits.max_body_bytes` (413 past it), decoded
(no NaN/Infinity, nesting at most `limits.max_json_depth`), held to the route's contract
(serve.contract.fields: allow-listed fields, bounds, prompt size, work per request), and only then
validated into vLLM's protocol model. Every refusal is a `BadRequest` naming the parameter,
answered in OpenAI's error shape by the ingress.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from serve.answers.errors import public_text
from serve.contract.fields import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    BadRequest,
    Bounds,
    chat_prompt_chars,
    check_fields,
    completion_prompt_size,
)

__all__ = ["BadRequest", "Bounds", "Checked", "parse_body", "validate_body"]
CHARS_PER_TOKEN = 4  # the prompt estimate before tokenising (English text: ~4 characters/token)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions


@dataclass(frozen=True)
class Checked:
    """A body that passed the contract: vLLM's protocol model and the tokens it may cost."""

    body: Any
    tokens: int  # prompt estimate + max_tokens x n (x prompts): what fair use counts


def too_large(limit: int) -> BadRequest:
    return BadRequest(
        f"the request body exceeds {limit} bytes", status=413, code="request_too_large"
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read no further than `limit` bytes (413 past it, declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length header")
        if int(declared) > limit:
            raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _depth_within(value: Any, limit: int) -> bool:
    """True when objects and arrays nest at most `limit` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return False
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return True


def decode(raw: bytes, max_depth: int) -> dict:
    try:
        decoded = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest(f"the request body nests deeper than {max_depth} levels") from None
    except ValueError:  # also UnicodeDecodeError
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(decoded, dict):
        raise BadRequest("the request body must be a JSON object")
    if not _depth_within(decoded, max_depth):
        raise BadRequest(f"the request body nests deeper than {max_depth} levels")
    return decoded


def _work(raw: dict, max_tokens: int, prompts: int, bounds: Bounds) -> int:
    """Tokens the request may generate (max_tokens x n x prompts), refused past the cap."""
    n = raw.get("n") or 1
    work = max_tokens * n * prompts
    cap = bounds.limits.max_request_tokens
    if work > cap:
        raise BadRequest(
            f"this request may generate {work} tokens (max_tokens {max_tokens} x n {n}"
            + (f" x {prompts} prompts" if prompts > 1 else "")
            + f"), more than the {cap} allowed per request; lower max_tokens or n",
            "n" if max_tokens * prompts <= cap else "max_tokens",  # what pushed it over
        )
    return work


def _prompt_chars(chars: int, bounds: Bounds, param: str) -> None:
    if chars > bounds.limits.max_prompt_chars:
        raise BadRequest(
            f"the prompt holds {chars} characters, more than the "
            f"{bounds.limits.max_prompt_chars} allowed",
            param,
        )


def check_chat(raw: dict, bounds: Bounds) -> int:
    """The chat contract; returns the tokens the request may cost."""
    check_fields(raw, CHAT_FIELDS, bounds)
    chars = chat_prompt_chars(raw, bounds)
    _prompt_chars(chars, bounds, "messages")
    if raw.get("top_logprobs") and not raw.get("logprobs"):
        raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    max_tokens = raw.get("max_completion_tokens") or raw.get("max_tokens") or bounds.max_model_len
    return math.ceil(chars / CHARS_PER_TOKEN) + _work(raw, max_tokens, 1, bounds)


def check_completion(raw: dict, bounds: Bounds) -> int:
    """The completions contract; returns the tokens the request may cost."""
    check_fields(raw, COMPLETION_FIELDS, bounds)
    prompts, chars, ids = completion_prompt_size(raw, bounds)
    _prompt_chars(chars, bounds, "prompt")
    max_tokens = raw.get("max_tokens") or COMPLETION_DEFAULT_MAX_TOKENS
    return math.ceil(chars / CHARS_PER_TOKEN) + ids + _work(raw, max_tokens, prompts, bounds)


CHECKS = {"chat": check_chat, "completion": check_completion}


def validate_body(raw: bytes, model: type[BaseModel], kind: str, bounds: Bounds) -> Checked:
    """The raw body as `model` (a vLLM protocol model), or BadRequest with an OpenAI message."""
    decoded = decode(raw, bounds.limits.max_json_depth)
    tokens = CHECKS[kind](decoded, bounds)
    try:
        return Checked(model.model_validate(decoded), tokens)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        fallback = f"invalid '{param}'"
        raise BadRequest(public_text(f"{fallback}: {first['msg']}", fallback), param) from None
    except (TypeError, ValueError):  # raised raw by some of vLLM's validators
        raise BadRequest("the request does not match the route's schema") from None


async def parse_body(request: Request, model: type[BaseModel], kind: str, bounds: Bounds):
    """The request's body as a `Checked`, or BadRequest (see `validate_body`)."""
    raw = await read_body(request, bounds.limits.max_body_bytes)
    return validate_body(raw, model, kind, bounds)
