"""The request contract: which fields each route accepts, and the bounds of each.

The allow-lists are OpenAI's documented parameters for the route that vLLM implements, nothing
of vLLM's wider request model: a field outside them (unknown, a vLLM extra, or one vLLM removed
such as `guided_json`) is refused with 400 naming it, as OpenAI's API refuses an unrecognised
argument, so no caller believes a constraint applies that does not. Everything here works on the
decoded JSON (dicts, lists, scalars) and costs microseconds; nothing tokenises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.core.serve_config import LimitSettings


class BadRequest(Exception):
    """A request the contract refuses; `status` 400 unless said otherwise (413 for size)."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400, code=None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass(frozen=True)
class Bounds:
    """The limits of one app: LimitSettings plus the engine's context length."""

    limits: LimitSettings
    max_model_len: int


# Refused with a reason, so a caller sees why rather than only "unsupported".
NOT_SUPPORTED = {
    **dict.fromkeys(
        [
            "guided_json",
            "guided_regex",
            "guided_choice",
            "guided_grammar",
            "guided_whitespace_pattern",
            "guided_decoding_backend",
            "structured_outputs",
        ],
        "the engine no longer applies it, so no constraint would hold; use response_format",
    ),
    **dict.fromkeys(
        ["tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"],
        "tool calling is not enabled on this endpoint",
    ),
    "suffix": "the engine does not support it",
    "best_of": "the engine does not support best_of above 1; use n",
}
INT64 = 2**63
MAX_NAME_CHARS = 256
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300
MAX_TOKEN_ID = 2**31 - 1
ROLES = frozenset({"system", "developer", "user", "assistant"})
MESSAGE_KEYS = frozenset({"role", "content", "name"})


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(name: str, value, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be an integer between {low} and {high}", name)
    return value


def _number(name: str, value, low: float, high: float, *, low_open: bool = False) -> None:
    ok = (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    if not ok or not (low < value if low_open else low <= value) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise BadRequest(f"'{name}' must be a number in {interval}", name)


def _bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false", name)


def _str(name: str, value, max_chars: int) -> None:
    if not isinstance(value, str) or len(value) > max_chars:
        raise BadRequest(f"'{name}' must be a string of at most {max_chars} characters", name)


def _stop(value, _bounds) -> None:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > 4:
        raise BadRequest("'stop' must be a string or a list of at most 4 strings", "stop")
    for item in items:
        if not isinstance(item, str) or not 0 < len(item) <= MAX_STOP_CHARS:
            raise BadRequest(f"each 'stop' must be 1 to {MAX_STOP_CHARS} characters", "stop")


def _logit_bias(value, _bounds) -> None:
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise BadRequest(
            f"'logit_bias' must map at most {MAX_LOGIT_BIAS} token ids to numbers", "logit_bias"
        )
    for token, bias in value.items():
        is_id = token.isascii() and token.isdigit() and len(token) <= 10
        if not is_id or int(token) > MAX_TOKEN_ID:
            raise BadRequest(f"'logit_bias' key {token[:20]!r} is not a token id", "logit_bias")
        _number("logit_bias", bias, -100, 100)


def _stream_options(value, _bounds) -> None:
    if not isinstance(value, dict) or not set(value) <= {"include_usage"}:
        raise BadRequest(
            "'stream_options' accepts only {\"include_usage\": bool}", "stream_options"
        )
    if "include_usage" in value:
        _bool("stream_options.include_usage", value["include_usage"])


def _response_format(value, _bounds) -> None:
    if (
        not isinstance(value, dict)
        or set(value) != {"type"}
        or value["type"]
        not in (
            "text",
            "json_object",
        )
    ):
        raise BadRequest(
            '\'response_format\' must be {"type": "text"} or {"type": "json_object"} '
            "(json_schema is not enabled on this endpoint)",
            "response_format",
        )


def _tokens(name: str):
    return lambda value, b: _int(name, value, 1, b.max_model_len)


COMMON = {
    "model": lambda v, b: v is None or _str("model", v, MAX_NAME_CHARS),
    "frequency_penalty": lambda v, b: _number("frequency_penalty", v, -2, 2),
    "presence_penalty": lambda v, b: _number("presence_penalty", v, -2, 2),
    "temperature": lambda v, b: _number("temperature", v, 0, 2),
    "top_p": lambda v, b: _number("top_p", v, 0, 1, low_open=True),
    "seed": lambda v, b: _int("seed", v, -INT64, INT64 - 1),
    "n": lambda v, b: _int("n", v, 1, b.limits.max_n),
    "max_tokens": _tokens("max_tokens"),
    "stop": _stop,
    "stream": lambda v, b: _bool("stream", v),
    "stream_options": _stream_options,
    "logit_bias": _logit_bias,
    "user": lambda v, b: _str("user", v, MAX_NAME_CHARS),
}
CHAT_FIELDS = {
    **COMMON,
    "messages": lambda v, b: None,  # checked with the prompt text, see chat_prompt_chars
    "max_completion_tokens": _tokens("max_completion_tokens"),
    "logprobs": lambda v, b: _bool("logprobs", v),
    "top_logprobs": lambda v, b: _int("top_logprobs", v, 0, b.limits.max_logprobs),
    "response_format": _response_format,
}
COMPLETION_FIELDS = {
    **COMMON,
    "prompt": lambda v, b: None,  # checked with the prompt text, see completion_prompt_size
    "echo": lambda v, b: _bool("echo", v),
    "logprobs": lambda v, b: _int("logprobs", v, 0, b.limits.max_logprobs),
    "best_of": lambda v, b: _int("best_of", v, 1, 1),
}


def check_fields(raw: dict, fields: dict, bounds: Bounds) -> None:
    """Every field of `raw` is allow-listed for the route and within its bounds (null = unset)."""
    for name, value in raw.items():
        check = fields.get(name)
        if check is None:
            reason = NOT_SUPPORTED.get(name, "it is not a parameter of this route")
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise BadRequest(f"unsupported parameter '{shown}': {reason}", shown)
        if value is not None:
            check(value, bounds)


def _content_chars(i: int, content) -> int:
    if isinstance(content, str):
        return len(content)
    param = f"messages[{i}].content"
    if not isinstance(content, list) or not content:
        raise BadRequest(f"'{param}' must be a string or a non-empty list of text parts", param)
    chars = 0
    for part in content:
        if (
            not isinstance(part, dict)
            or part.get("type") != "text"
            or not set(part) <= {"type", "text"}
            or not isinstance(part.get("text"), str)
        ):
            raise BadRequest(
                f'\'{param}\' parts must be {{"type": "text", "text": <string>}} '
                "(this model takes text only)",
                param,
            )
        chars += len(part["text"])
    return chars


def chat_prompt_chars(raw: dict, bounds: Bounds) -> int:
    """Characters of message text in a chat body, checking each message's shape."""
    messages = raw.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(
            "'messages' must be a non-empty list of {role, content} objects", "messages"
        )
    if len(messages) > bounds.limits.max_messages:
        raise BadRequest(f"'messages' holds at most {bounds.limits.max_messages}", "messages")
    chars = 0
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequest(
                f"'messages[{i}]' must be an object whose 'role' is one of "
                + ", ".join(sorted(ROLES)),
                f"messages[{i}]",
            )
        if extra := set(message) - MESSAGE_KEYS:
            name = sorted(extra)[0][:64]
            raise BadRequest(f"unsupported field '{name}' in 'messages[{i}]'", f"messages[{i}]")
        if "name" in message:
            _str(f"messages[{i}].name", message["name"], 64)
        chars += _content_chars(i, message.get("content"))
    return chars


def completion_prompt_size(raw: dict, bounds: Bounds) -> tuple[int, int, int]:
    """(prompts, characters, token ids) of a completions body's `prompt`, checking its shape."""
    prompt = raw.get("prompt")
    limits = bounds.limits
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompt = [prompt]  # one prompt given as token ids
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest(
            "'prompt' must be a non-empty string, list of strings, or list of token ids",
            "prompt",
        )
    if len(prompt) > limits.max_prompts:
        raise BadRequest(f"'prompt' holds at most {limits.max_prompts} prompts", "prompt")
    chars = ids = 0
    for item in prompt:
        if isinstance(item, str) and item:
            chars += len(item)
        elif (
            isinstance(item, list)
            and 0 < len(item) <= bounds.max_model_len
            and all(_is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in item)
        ):
            ids += len(item)
        else:
            raise BadRequest(
                "each prompt must be a non-empty string or a list of token ids "
                f"(at most {bounds.max_model_len})",
                "prompt",
            )
    return len(prompt), chars, ids
