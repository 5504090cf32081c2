"""The request log as the ingress writes it, over ASGI with a fake engine: what an entry holds
and never holds, token counts of whole and streamed answers, and streams left as callers sent
them."""

from __future__ import annotations

import asyncio
import json

from fastapi.responses import JSONResponse, StreamingResponse

from cluster.core.credentials import hash_api_key
from cluster.records.request_log import read_entries
from serve.answers import tap
from serve.answers.log import AnswerLogSettings
from serve.answers.tap import parsed
from tests.serve.fake_engine import BASE, KEY, auth, ingress_client

SECRET_PROMPT = "my card number is 4111 1111 1111 1111"
CHAT = {"model": BASE, "messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 4}
USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


def settings(tmp_path, **options) -> AnswerLogSettings:
    values = {"prompt_features": False, "prompt_text": False, **options}
    return AnswerLogSettings(directory=str(tmp_path), retention_days=30, **values)


def streamed(body, fail: bool = False) -> StreamingResponse:
    """What vLLM streams: token chunks, then (asked or not) the usage-only chunk, then DONE."""

    async def events():
        for text in ("Pa", "ris"):
            chunk = {"id": "chatcmpl-1", "model": BASE, "choices": [{"delta": {"content": text}}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        if fail:
            raise RuntimeError("engine died")
        if body.stream_options and body.stream_options.include_usage:
            yield f'data: {{"id":"chatcmpl-1","choices":[],"usage":{json.dumps(USAGE)}}}\n\n'
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def ask(log: AnswerLogSettings, body: dict, reply=None, headers=None):
    async def go():
        client, engine = ingress_client(answer_log=log)
        if reply:
            engine.reply = reply
        async with client:
            response = await client.post(
                "/v1/chat/completions", json=body, headers={**auth(), **(headers or {})}
            )
        return response, engine

    return asyncio.run(go())


def test_a_whole_answer_is_logged_with_ids_key_id_and_tokens_never_the_key_or_prompt(tmp_path):
    answer = {"id": "chatcmpl-9", "object": "chat.completion", "model": BASE, "choices": []}
    reply = lambda body: JSONResponse({**answer, "usage": USAGE})  # noqa: E731
    response, _ = ask(settings(tmp_path), CHAT, reply, {"X-Request-ID": "req-42"})
    assert response.status_code == 200
    (entry,) = read_entries(tmp_path).entries
    assert (entry.request_id, entry.response_id) == ("req-42", "chatcmpl-9")
    assert (
        entry.key_id == hash_api_key(KEY).removeprefix("sha256:")[:12] and len(entry.key_id) == 12
    )
    assert entry.answered_by == BASE
    assert (entry.prompt_tokens, entry.completion_tokens, entry.complete) == (11, 3, True)
    assert entry.adapter is None and entry.prompt is None and entry.features is None
    logged = "".join(p.read_text() for p in tmp_path.glob("*.jsonl"))
    assert KEY not in logged and "4111" not in logged


def test_prompt_text_and_features_only_when_each_is_turned_on(tmp_path):
    ask(settings(tmp_path / "features", prompt_features=True), CHAT)
    (entry,) = read_entries(tmp_path / "features").entries
    assert entry.prompt is None and entry.features["scalars"]["digit_fraction"] > 0
    # A prompt that tries to forge a log line stays inside its own entry.
    forged = SECRET_PROMPT + '\n{"request_id": "forged", "answered_by": "evil:1"}\n'
    body = {**CHAT, "messages": [{"role": "user", "content": forged}]}
    ask(settings(tmp_path / "text", prompt_text=True), body)
    (entry,) = read_entries(tmp_path / "text").entries
    assert entry.prompt == forged and entry.features is None


def test_an_unwritable_log_costs_the_entry_not_the_answer(tmp_path, caplog):
    directory = tmp_path / "log"

    async def go():
        client, _ = ingress_client(answer_log=settings(directory))
        directory.rmdir()  # the log's place becomes unwritable after start (a full disk, a
        directory.write_text("")  # lost mount): every write fails
        async with client:
            return [
                await client.post("/v1/chat/completions", json=CHAT, headers=auth())
                for _ in range(3)
            ]

    assert [r.status_code for r in asyncio.run(go())] == [200, 200, 200]
    assert caplog.text.count("request log: could not write") == 1  # said once, not per answer


def test_a_stream_is_logged_with_its_usage_which_callers_who_did_not_ask_never_see(tmp_path):
    response, engine = ask(settings(tmp_path), {**CHAT, "stream": True}, streamed)
    ((sent, _),) = engine.calls
    assert sent.stream_options.include_usage  # asked of the engine for the log
    assert '"usage"' not in response.text and response.text.endswith("data: [DONE]\n\n")
    assert response.text.count('"delta"') == 2
    (entry,) = read_entries(tmp_path).entries
    assert entry.stream and entry.complete and entry.response_id == "chatcmpl-1"
    assert (entry.prompt_tokens, entry.completion_tokens) == (11, 3)


def test_a_caller_who_asked_for_usage_still_gets_it(tmp_path):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    response, _ = ask(settings(tmp_path), body, streamed)
    assert json.dumps(USAGE).replace(" ", "") in response.text.replace(" ", "")


def test_a_stream_that_failed_is_logged_as_cut_short(tmp_path):
    response, _ = ask(settings(tmp_path), {**CHAT, "stream": True}, lambda b: streamed(b, True))
    assert '"error"' in response.text
    (entry,) = read_entries(tmp_path).entries
    assert not entry.complete and entry.completion_tokens is None


def test_refusals_are_not_answers_and_are_not_logged(tmp_path):
    log = settings(tmp_path)
    assert ask(log, CHAT, headers={"Authorization": "Bearer wrong"})[0].status_code == 401
    assert ask(log, {**CHAT, "max_tokens": -1})[0].status_code == 400
    assert read_entries(tmp_path).entries == []


def test_each_stream_event_is_read_once_for_errors_relabelling_and_the_log(tmp_path, monkeypatch):
    read = []
    monkeypatch.setattr(tap, "parsed", lambda event: read.append(event) or parsed(event))
    response, _ = ask(settings(tmp_path), {**CHAT, "stream": True}, streamed)
    events = [event for event in read if event.strip()]
    assert len(events) == 4 and len(set(events)) == 4  # two deltas, usage, [DONE]: once each
    assert response.text.count('"delta"') == 2
    (entry,) = read_entries(tmp_path).entries
    assert entry.complete and entry.completion_tokens == 3
