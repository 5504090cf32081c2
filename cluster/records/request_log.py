"""The request log: one line per answer the endpoint gave, saying which version gave it.

Opt-in (`request_log.enabled` in the serve config). Each ingress replica appends JSON lines to
its own file per UTC day, `<dir>/requests-<YYYY-MM-DD>-<writer>.jsonl`: one writer per file, so
no locking, and one `write` per line on a file opened for appending, so a killed replica leaves
at most its last line torn (readers skip it and say so). Files older than the retention are
removed when a writer starts a new day.

What a line holds is `AnsweredRequest`: ids, time, the caller's key id (a prefix of the key's
sha256, never the key), the model asked for and the version and adapter digest that answered,
token counts; the prompt's text only when `request_log.prompt_text` is on, its drift features
(cluster.records.prompt_features) only when `request_log.prompt_features` is on.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

log = logging.getLogger(__name__)
FILE_NAME = re.compile(r"requests-(\d{4}-\d{2}-\d{2})-([A-Za-z0-9_.-]+)\.jsonl")
KEY_ID_CHARS = 12  # of the key's sha256: tells keys apart in an audit, cannot be used as one


class AnsweredRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    request_id: str  # Ray Serve's X-Request-ID (the OpenAI SDK's `_request_id`)
    response_id: str | None = None  # the answer's `id` (chatcmpl-..., cmpl-...)
    time: str  # UTC, ISO 8601, when the request arrived
    latency_ms: float
    key_id: str | None  # None: the endpoint runs without keys
    route: str  # "chat" or "completion"
    model: str  # as asked
    answered_by: str  # the id that answered: the base model's, or `<name>:<version>`
    adapter: str | None = None
    version: str | None = None
    adapter_sha256: str | None = None
    stream: bool
    complete: bool  # False: the stream was cut (client gone, engine lost)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt: str | None = None
    features: dict | None = None

    @property
    def timestamp(self) -> datetime:
        return datetime.fromisoformat(self.time)


def utc_iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


class RequestLogWriter:
    """Appends `AnsweredRequest` lines to this writer's file of the day."""

    def __init__(self, directory: str | Path, writer: str, retention_days: int):
        self.directory = Path(directory)
        self.writer = re.sub(r"[^A-Za-z0-9_.-]", "_", writer)
        self.retention_days = retention_days
        self._day: date | None = None
        self._file = None
        self.directory.mkdir(parents=True, exist_ok=True)

    def write(self, entry: AnsweredRequest) -> None:
        today = datetime.now(UTC).date()
        if today != self._day:
            self._open(today)
        # One write of one whole line: O_APPEND keeps lines of a crashed writer from mixing.
        self._file.write(entry.model_dump_json(exclude_none=True) + "\n")
        self._file.flush()

    def _open(self, day: date) -> None:
        if self._file:
            self._file.close()
        path = self.directory / f"requests-{day.isoformat()}-{self.writer}.jsonl"
        self._file = path.open("a", encoding="utf-8")
        self._day = day
        remove_expired(self.directory, day - timedelta(days=self.retention_days))


def remove_expired(directory: Path, before: date) -> None:
    for path in directory.glob("requests-*.jsonl"):
        match = FILE_NAME.fullmatch(path.name)
        if match and date.fromisoformat(match[1]) < before:
            path.unlink(missing_ok=True)
            log.info("request log: removed %s (past retention)", path.name)


@dataclass
class ReadResult:
    entries: list[AnsweredRequest]
    unreadable: int  # lines that are not entries (a torn last line, an edited file)


def read_entries(directory: str | Path, since: datetime | None = None) -> ReadResult:
    """Every entry in the log at `directory` (arrived at or after `since`), oldest first."""
    directory = Path(directory)
    entries, unreadable = [], 0
    paths = sorted(directory.glob("requests-*.jsonl")) if directory.is_dir() else []
    for path in paths:
        match = FILE_NAME.fullmatch(path.name)
        # Files are named by UTC day: compare with the UTC day `since` falls on.
        if not match or (since and date.fromisoformat(match[1]) < since.astimezone(UTC).date()):
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = AnsweredRequest.model_validate_json(line)
            except ValidationError:
                unreadable += 1
                continue
            if since is None or entry.timestamp >= since:
                entries.append(entry)
    entries.sort(key=lambda e: e.time)
    if unreadable:
        log.warning("request log %s: skipped %d unreadable lines", directory, unreadable)
    return ReadResult(entries, unreadable)


def parse_duration(text: str) -> timedelta | None:
    """`30m`, `24h`, `7d`, `90s` as a timedelta; None when `text` is not such a duration."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not match:
        return None
    return timedelta(seconds=float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]])


def parse_since(text: str) -> datetime:
    """A duration (that long ago) or an ISO 8601 time (UTC unless it says otherwise)."""
    duration = parse_duration(text)
    if duration is not None:
        return datetime.now(UTC) - duration
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"'{text}' is not a time: give a duration (30m, 24h, 7d) or an ISO 8601 time"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def writer_name() -> str:
    """This process's writer id: host and pid, unique among live writers sharing a directory."""
    return f"{os.uname().nodename}-{os.getpid()}"


def key_id(key_hash: str | None) -> str | None:
    """The first hex digits of a key's hash (`sha256:<hex>` or `<hex>`)."""
    return key_hash.removeprefix("sha256:")[:KEY_ID_CHARS] if key_hash else None
