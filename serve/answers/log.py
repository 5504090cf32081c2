"""The ingress side of the request log (cluster.records.request_log): one entry per answer.

The ingress knows which version and adapter digest answered (it resolved the model id) and whose
key asked; the token counts are in the answer's `usage`. A stream carries `usage` only when the
caller asked for it (`stream_options.include_usage`), so with the log on the ingress always asks
the engine for it (`with_usage`) and the stream tap (serve.answers.tap) drops that last chunk
again for callers who did not ask: they see the stream they would have seen without the log.
The tap hands each answer's id, usage and completeness to `Pending.write`; refusals and errors
are not answers and are not logged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from fastapi import Request

from cluster.records.prompt_features import prompt_features, prompt_text
from cluster.records.request_log import (
    AnsweredRequest,
    RequestLogWriter,
    key_id,
    utc_iso,
    writer_name,
)
from serve.adapters import AdapterRoute

log = logging.getLogger(__name__)
LOG_FAILURES_EVERY = 1000  # after the first failed write, say so once per this many


@dataclass(frozen=True)
class AnswerLogSettings:
    """Plain values (they pickle to the ingress replica): cluster.core.serve_config's section."""

    directory: str
    retention_days: int
    prompt_features: bool
    prompt_text: bool


def asked_text(body) -> str | None:
    """The prompt's text as the features see it; None for token-id prompts."""
    messages = getattr(body, "messages", None)
    if messages is not None:
        return prompt_text(m if isinstance(m, dict) else dict(m) for m in messages)
    prompt = body.prompt
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    return None


def with_usage(body):
    """`body` asking the engine for a stream's usage (a copy; the caller's own options kept)."""
    from vllm.entrypoints.openai.chat_completion.protocol import StreamOptions

    options = (body.stream_options or StreamOptions()).model_copy(update={"include_usage": True})
    return body.model_copy(update={"stream_options": options})


def caller_asked_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


class AnswerLog:
    def __init__(self, settings: AnswerLogSettings):
        self.settings = settings
        # Made here, so an unwritable directory stops the replica at start, naming it.
        self.writer = RequestLogWriter(settings.directory, writer_name(), settings.retention_days)
        self.failed_writes = 0

    def write(self, entry: AnsweredRequest) -> None:
        """Append `entry`; a failed write (disk full) is logged, and the answer still goes out:
        it is computed, and a stream is already with the caller."""
        try:
            self.writer.write(entry)
        except OSError as exc:
            if self.failed_writes % LOG_FAILURES_EVERY == 0:
                log.error(
                    "request log: could not write to %s (%s); %d answers unlogged so far",
                    self.settings.directory,
                    exc,
                    self.failed_writes + 1,
                )
            self.failed_writes += 1

    def begin(self, request: Request, body, route_kind: str, key_hash: str | None) -> Pending:
        """Called once the body passed the contract; `body` as the caller sent it, `key_hash`
        the hash of its bearer key (serve.access.keys.Caller)."""
        wanted = self.settings.prompt_features or self.settings.prompt_text
        text = asked_text(body) if wanted else None
        return Pending(
            answer_log=self,
            started=time.time(),
            request_id=request.headers.get("x-request-id", ""),
            key_id=key_id(key_hash),
            route=route_kind,
            model=body.model or "",
            stream=bool(getattr(body, "stream", False)),
            usage_asked=caller_asked_usage(body),
            prompt=text if self.settings.prompt_text else None,
            features=prompt_features(text).to_json()
            if self.settings.prompt_features and text is not None
            else None,
        )


@dataclass
class Pending:
    """An answer under way: written to the log when its body is complete (or cut)."""

    answer_log: AnswerLog
    started: float
    request_id: str
    key_id: str | None
    route: str
    model: str
    stream: bool
    usage_asked: bool
    prompt: str | None
    features: dict | None

    def write(self, answered_by: str, route: AdapterRoute | None, answer: dict, complete: bool):
        usage = answer.get("usage") or {}
        digest = (route.adapter_sha256 or None) if route else None
        self.answer_log.write(
            AnsweredRequest(
                request_id=self.request_id,
                response_id=answer.get("id"),
                time=utc_iso(self.started),
                latency_ms=round((time.time() - self.started) * 1000, 1),
                key_id=self.key_id,
                route=self.route,
                model=self.model,
                answered_by=answered_by,
                adapter=route.name if route else None,
                version=route.version if route else None,
                adapter_sha256=digest,
                stream=self.stream,
                complete=complete,
                prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=usage.get("completion_tokens"),
                prompt=self.prompt,
                features=self.features,
            )
        )
