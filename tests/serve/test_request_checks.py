"""The request contract without a server: bad bodies become BadRequest naming the parameter."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Literal

import pytest
from pydantic import BaseModel
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.requests import Request

from cluster.core.serve_config import LimitSettings
from serve.contract.checks import (
    BadRequest,
    Bounds,
    check_chat,
    check_completion,
    parse_body,
    validate_body,
)

MAX_LEN = 512
LIMITS = LimitSettings(max_body_bytes=4096, max_request_tokens=1024)
BOUNDS = Bounds(LIMITS, MAX_LEN)
HI = [{"role": "user", "content": "hi"}]


def request(body: bytes, headers: dict[str, str] | None = None, chunks: int = 1) -> Request:
    """A starlette POST request carrying `body` in `chunks` pieces, as the ingress receives it."""
    size = max(1, len(body) // chunks + 1)
    parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]

    async def receive():
        part = parts.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(parts)}

    raw = [(b"content-type", b"application/json")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "headers": raw}, receive)


def parse(body: bytes | dict | list | str, model=ChatCompletionRequest, kind: str = "chat"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return asyncio.run(parse_body(request(raw), model, kind, BOUNDS)).body


def refused(body: dict, kind: str = "chat") -> BadRequest:
    check = check_chat if kind == "chat" else check_completion
    with pytest.raises(BadRequest) as caught:
        check(body, BOUNDS)
    return caught.value


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"messages": NaN}', "not valid JSON"),
        ([{"model": "m", "messages": HI}], "must be a JSON object"),
        ("just a string", "must be a JSON object"),
        (b"[" * 4000, "nests deeper"),  # Python's own RecursionError, caught
        (
            {"messages": HI, "logit_bias": {"1": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]}},
            "nests deeper",
        ),
    ],
    ids=["malformed", "not-utf8", "nan", "array", "string", "recursion", "deep"],
)
def test_a_body_that_is_not_a_bounded_json_object_is_refused(body, message):
    with pytest.raises(BadRequest, match=message) as caught:
        parse(body)
    assert caught.value.param is None and caught.value.status == 400


@pytest.mark.parametrize("chunks", [1, 7])
def test_a_body_over_the_size_cap_gets_413_declared_or_streamed(chunks):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    for headers in ({"content-length": str(len(big))}, {}):
        with pytest.raises(BadRequest) as caught:
            asyncio.run(
                parse_body(request(big, headers, chunks), ChatCompletionRequest, "chat", BOUNDS)
            )
        assert (caught.value.status, caught.value.code) == (413, "request_too_large")


@pytest.mark.parametrize(
    ("field", "kind"),
    [
        ("guided_json", "chat"),
        ("guided_regex", "completion"),
        ("tools", "chat"),
        ("ignore_eos", "completion"),
        ("chat_template", "chat"),
        ("suffix", "completion"),
        ("prompt", "chat"),
        ("messages", "completion"),
        ("no_such_field", "chat"),
    ],
)
def test_a_field_outside_the_routes_allow_list_is_named_in_param(field, kind):
    base = {"messages": HI} if kind == "chat" else {"prompt": "hi"}
    error = refused({**base, field: {"type": "object"}}, kind)
    assert error.param == field and f"'{field}'" in error.message


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 5}, "n"),
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": 1}, "logprobs"),  # chat's logprobs is a bool
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"seed": 2**64}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"²": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        (
            {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
            "stream_options",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": MAX_LEN + 1}, "max_tokens"),
        ({"max_completion_tokens": 2.5}, "max_completion_tokens"),
        ({"max_tokens": 300, "n": 4}, "n"),  # 1200 tokens of work > 1024
        ({"n": 3}, "n"),  # without max_tokens the context length counts: 3 x 512 > 1024
        ({"user": "u" * 300}, "user"),
    ],
)
def test_chat_bounds_name_the_parameter(extra, param):
    error = refused({"messages": HI, **extra})
    assert error.param == param, error.message


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (3.7, "messages"),
        ([], "messages"),
        (None, "messages"),
        (HI * (LIMITS.max_messages + 1), "messages"),
        ([{"content": "no role"}], "messages[0]"),
        ([{"role": "tool", "content": "x"}], "messages[0]"),
        ([{"role": "user", "content": "hi"}, "hi"], "messages[1]"),
        ([{"role": "user", "content": "hi", "tool_calls": []}], "messages[0]"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
            "messages[0].content",
        ),
        ([{"role": "user", "content": "x" * (LIMITS.max_prompt_chars + 1)}], "messages"),
    ],
    ids=[
        "number",
        "empty",
        "missing",
        "too-many",
        "no-role",
        "tool-role",
        "not-an-object",
        "extra-key",
        "no-content",
        "image",
        "too-many-chars",
    ],
)
def test_bad_messages_name_the_parameter(messages, param):
    body = {"model": "m"} if messages is None else {"model": "m", "messages": messages}
    assert refused(body).param == param


@pytest.mark.parametrize(
    ("prompt", "extra", "param"),
    [
        ("", {}, "prompt"),
        ([], {}, "prompt"),
        (3, {}, "prompt"),
        (["a", ""], {}, "prompt"),
        (["a"] * (LIMITS.max_prompts + 1), {}, "prompt"),
        ([[1, 2], [-1]], {}, "prompt"),
        ([1] * (MAX_LEN + 1), {}, "prompt"),
        ("x" * (LIMITS.max_prompt_chars + 1), {}, "prompt"),
        ("hi", {"logprobs": LIMITS.max_logprobs + 1}, "logprobs"),
        ("hi", {"best_of": 2}, "best_of"),
        ("hi", {"max_tokens": 0}, "max_tokens"),
        (["a"] * 8, {"max_tokens": 100, "n": 2}, "n"),  # 8 x 2 x 100 > 1024
    ],
)
def test_completion_prompt_and_bounds(prompt, extra, param):
    assert refused({"prompt": prompt, **extra}, "completion").param == param


def test_tokens_count_the_prompt_estimate_and_the_work():
    assert (
        check_chat(
            {"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 8, "n": 2}, BOUNDS
        )
        == 10 + 16
    )
    assert check_completion({"prompt": ["abcd", [1, 2, 3]]}, BOUNDS) == 1 + 3 + 2 * 16


class NamedModel(BaseModel):
    """Stands in for a protocol model that refuses what the contract let through."""

    model: Literal["a", "b"]
    messages: list


def test_a_shape_the_protocol_model_refuses_is_a_bad_request_without_class_names():
    with pytest.raises(BadRequest, match="invalid 'model'") as caught:
        validate_body(
            b'{"model": "c", "messages": [{"role": "user", "content": "hi"}]}',
            NamedModel,
            "chat",
            BOUNDS,
        )
    assert caught.value.param == "model"
    assert "NamedModel" not in caught.value.message


def test_a_good_body_parses_into_the_protocol_model():
    chat = parse(
        {
            "model": "m",
            "messages": [{"role": "system", "content": "be brief"}, *HI],
            "max_tokens": MAX_LEN,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True,
            "top_logprobs": 2,
            "stop": ["\n"],
            "seed": 7,
            "logit_bias": {"42": -100},
            "response_format": {"type": "json_object"},
        }
    )
    assert isinstance(chat, ChatCompletionRequest)
    assert (chat.model, chat.max_tokens, chat.stream) == ("m", MAX_LEN, True)
    assert chat.messages[1]["content"] == "hi"
    completion = parse(
        {"prompt": "Hello", "max_tokens": 3, "best_of": 1}, CompletionRequest, "completion"
    )
    assert isinstance(completion, CompletionRequest) and completion.prompt == "Hello"


def test_the_checks_cost_well_under_2_ms_per_request():
    body = json.dumps(
        {
            "model": "fedforge-base",
            "messages": [
                {"role": "system", "content": "You route support tickets. " * 10},
                {"role": "user", "content": "My invoice is wrong; please check last month's."},
            ],
            "max_tokens": 64,
            "temperature": 0.7,
            "stream": True,
        }
    ).encode()
    times = []
    for _ in range(300):
        started = time.perf_counter()
        validate_body(body, ChatCompletionRequest, "chat", BOUNDS)
        times.append(time.perf_counter() - started)
    p50 = statistics.median(times)
    print(f"[checks] p50 {p50 * 1e6:.0f} us per chat body (decode + contract + protocol model)")
    assert p50 < 0.002
