"""The body parser without a server: bad bodies become BadRequest naming the parameter."""

from __future__ import annotations

import asyncio
import json

import pytest
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.requests import Request

from serve.request_checks import BadRequest, check_chat, check_completion, parse_body

MAX_LEN = 512
HI = [{"role": "user", "content": "hi"}]


def request(body: bytes) -> Request:
    """A starlette POST request carrying `body`, as the ingress receives it."""

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", b"application/json")]
    return Request({"type": "http", "method": "POST", "headers": headers}, receive)


def parse(body: bytes | dict | list, model=ChatCompletionRequest, kind: str = "chat"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return asyncio.run(parse_body(request(raw), model, kind, MAX_LEN))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ([{"model": "m", "messages": HI}], "must be a JSON object"),
        ("just a string", "must be a JSON object"),
    ],
    ids=["malformed", "not-utf8", "array", "string"],
)
def test_a_body_that_is_not_a_json_object_is_refused(body, message):
    with pytest.raises(BadRequest, match=message) as refused:
        parse(body)
    assert refused.value.param is None


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (3.7, "messages"),
        ([], "messages"),
        (None, "messages"),
        ([{"content": "no role"}], "messages[0]"),
        ([{"role": "user", "content": "hi"}, "hi"], "messages[1]"),
    ],
    ids=["number", "empty", "missing", "no-role", "not-an-object"],
)
def test_bad_messages_name_the_parameter(messages, param):
    body = {"model": "m"} if messages is None else {"model": "m", "messages": messages}
    with pytest.raises(BadRequest) as refused:
        check_chat(body, MAX_LEN)
    assert refused.value.param == param and param in refused.value.message


@pytest.mark.parametrize("value", [0, -1, MAX_LEN + 1, 2.5, True, "16"])
@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_out_of_range_token_limits_are_refused(name, value):
    with pytest.raises(BadRequest, match=f"between 1 and {MAX_LEN}") as refused:
        check_chat({"messages": HI, name: value}, MAX_LEN)
    assert refused.value.param == name


@pytest.mark.parametrize("prompt", ["", [], None, 3])
def test_a_completion_needs_a_prompt(prompt):
    with pytest.raises(BadRequest, match="'prompt'"):
        check_completion({"prompt": prompt, "max_tokens": 4}, MAX_LEN)
    with pytest.raises(BadRequest, match="'max_tokens'"):
        check_completion({"prompt": "hi", "max_tokens": 0}, MAX_LEN)


def test_a_shape_the_protocol_model_refuses_is_a_bad_request():
    with pytest.raises(BadRequest, match="invalid") as refused:
        parse({"model": "m", "messages": HI, "temperature": "hot"})
    assert refused.value.param == "temperature"


def test_a_good_body_parses_into_the_protocol_model():
    chat = parse({"model": "m", "messages": HI, "max_tokens": MAX_LEN, "stream": True})
    assert isinstance(chat, ChatCompletionRequest)
    assert (chat.model, chat.max_tokens, chat.stream) == ("m", MAX_LEN, True)
    assert chat.messages[0]["content"] == "hi"
    completion = parse({"prompt": "Hello", "max_tokens": 3}, CompletionRequest, "completion")
    assert isinstance(completion, CompletionRequest) and completion.prompt == "Hello"
