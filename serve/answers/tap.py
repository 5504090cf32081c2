"""The answer on its way back to the caller: read once, by one tap that feeds every consumer.

A whole answer's JSON is parsed once; a stream's events are parsed once each, as they pass. From
that one reading:
- errors (serve.answers.errors): an engine refusal as a stream's first event becomes a plain 4xx
  (vLLM streams its own validation errors after a 200); a later error event loses its internal
  text, and a failure mid-stream ends the stream with an error event, not a cut connection;
- relabelling: the engine answers an adapter request with its internal id
  (`<base>:<name>:<version>`); like OpenAI's aliases (ask `gpt-4o`, get `gpt-4o-2024-08-06`),
  `model` becomes the version that answered, `<name>:<version>`, and the `X-Fedforge-Model` header
  says the same, `X-Fedforge-Adapter-Sha256` the digest of that version's registered files (what
  the engine loaded: the registry checks it on every download);
- the answer log (serve.answers.log): the answer's id, usage and whether it completed; the usage
  chunk asked of the engine only for the log is dropped again.
A response of any status but 200 is no answer: it passes unchanged but for its error events.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import Response
from fastapi.responses import JSONResponse, StreamingResponse

from serve.adapters import AdapterRoute
from serve.answers.errors import (
    engine_refusal,
    error_for_exception,
    failure_event,
    public_error_event,
)
from serve.answers.log import Pending

MODEL_HEADER = "X-Fedforge-Model"
DIGEST_HEADER = "X-Fedforge-Adapter-Sha256"
DONE = "data: [DONE]"
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Answerer:
    """Who answers a request: the id the engine's answer carries, and the id that answered as
    callers know it (with its adapter route, None for the base model)."""

    engine_id: str
    answered_by: str
    route: AdapterRoute | None = None

    def relabelled(self, text: str) -> str:
        # vLLM serializes answers with pydantic's compact JSON: `"model":"<id>"` verbatim.
        return text.replace(f'"model":"{self.engine_id}"', f'"model":"{self.answered_by}"')


def parsed(event: str) -> dict | None:
    """The JSON object of a `data:` event; None for anything else ([DONE], comments, parts)."""
    if not event.startswith("data: "):
        return None
    try:
        data = json.loads(event.removeprefix("data: "))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def read(chunk: str | bytes) -> list[tuple[str, str, dict | None]]:
    """A stream chunk's events, each parsed once: (event, the separator after it, its JSON)."""
    text = chunk.decode(errors="replace") if isinstance(chunk, bytes) else chunk
    pieces = text.split(SEPARATOR)  # its events, then what follows the last separator
    ends = [SEPARATOR] * (len(pieces) - 1) + [""]
    return [(event, end, parsed(event)) for event, end in zip(pieces, ends, strict=True)]


class _Stream:
    """One stream's reading: events in, events out, and what the answer log needs."""

    def __init__(self, answerer: Answerer, entry: Pending | None):
        self.answerer = answerer
        self.entry = entry
        self.drop_usage = entry is not None and not entry.usage_asked
        self.noted: dict = {}  # the answer's id and usage, and whether an error went by
        self.complete = False

    def passed(self, chunk: str | bytes, events: list) -> str | bytes:
        """`chunk` (read into `events`) as the caller gets it; the same object when nothing in
        it changes."""
        kept, changed = [], False
        for event, end, data in events:
            if event.strip() == DONE:
                self.complete = "error" not in self.noted
            if data is None:
                kept.append(event + end)
                continue
            self.noted.setdefault("id", data.get("id"))
            if "error" in data:  # it ends the stream: the rest of the chunk is dropped
                self.noted["error"] = True
                kept.append(public_error_event(data))
                changed = True
                break
            if data.get("usage"):
                self.noted["usage"] = data["usage"]
                if self.drop_usage and not data.get("choices"):
                    changed = True  # the usage chunk this caller did not ask for
                    continue
            if data.get("model") == self.answerer.engine_id != self.answerer.answered_by:
                event, changed = self.answerer.relabelled(event), True
            kept.append(event + end)
        if not changed:
            return chunk
        out = "".join(kept)
        return out.encode() if isinstance(chunk, bytes) else out

    async def events(self, first, first_events: list, rest: AsyncIterator[str | bytes]):
        try:
            if first is not None:
                yield self.passed(first, first_events)
            async for chunk in rest:
                yield self.passed(chunk, read(chunk))
        except Exception as exc:  # noqa: BLE001 - the status line is sent; only an event can say it
            self.complete = False
            yield failure_event(exc)
        finally:  # also when the caller went away mid-stream
            if self.entry:
                answerer = self.answerer
                self.entry.write(answerer.answered_by, answerer.route, self.noted, self.complete)


async def _stream(
    response: StreamingResponse, answerer: Answerer, entry: Pending | None, until
) -> Response:
    """The streamed answer, or the engine's refusal in its first event as a plain error.
    `until` (EngineWatch.unless_down) bounds the wait for the first event."""
    chunks = response.body_iterator
    try:
        first = await (until(anext(chunks)) if until else anext(chunks))
    except StopAsyncIteration:
        first = None  # an empty stream: nothing to pass on, still an answer to log
    except Exception as exc:  # noqa: BLE001 - nothing is sent yet: answer with a status
        return error_for_exception(exc)
    first_events = read(first) if first is not None else []
    head = first_events[0][2] if first_events else None
    if head is not None and "error" in head:
        if hasattr(chunks, "aclose"):
            await chunks.aclose()
        return engine_refusal(head, first_events[0][0])
    if response.status_code != 200:  # not an answer: error events made public, nothing else
        answerer, entry = Answerer(answerer.engine_id, answerer.engine_id), None
    response.body_iterator = _Stream(answerer, entry).events(first, first_events, chunks)
    return response


def _whole(response: Response, answerer: Answerer, entry: Pending | None) -> Response:
    relabel = isinstance(response, JSONResponse) and answerer.engine_id != answerer.answered_by
    if not relabel and entry is None:
        return response
    answer = json.loads(response.body) if isinstance(response, JSONResponse) else {}
    if relabel:
        if answer.get("model") == answerer.engine_id:
            answer["model"] = answerer.answered_by
        response = JSONResponse(answer, status_code=response.status_code)
    if entry:
        entry.write(answerer.answered_by, answerer.route, answer, complete=True)
    return response


async def tapped(
    response: Response,
    answerer: Answerer,
    entry: Pending | None = None,
    until: Callable[[Awaitable], Awaitable] | None = None,
) -> Response:
    """`response` on its way to the caller: checked, relabelled and, with `entry`, logged."""
    if isinstance(response, StreamingResponse):
        response = await _stream(response, answerer, entry, until)
    if response.status_code != 200:
        return response
    if not isinstance(response, StreamingResponse):
        response = _whole(response, answerer, entry)
    response.headers[MODEL_HEADER] = answerer.answered_by
    if answerer.route and answerer.route.adapter_sha256:
        response.headers[DIGEST_HEADER] = answerer.route.adapter_sha256
    return response
