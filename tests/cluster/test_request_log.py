"""The request log's file format: written by each ingress replica, read by the audit and drift
commands, surviving a torn line and keeping only its retention."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from cluster.records.request_log import (
    AnsweredRequest,
    RequestLogWriter,
    key_id,
    parse_duration,
    parse_since,
    read_entries,
    utc_iso,
)


def entry(request_id: str, when: datetime, **fields) -> AnsweredRequest:
    return AnsweredRequest(
        request_id=request_id,
        time=utc_iso(when.timestamp()),
        latency_ms=12.5,
        key_id="0123456789ab",
        route="chat",
        model="support-bot",
        answered_by="support-bot:2",
        adapter="support-bot",
        version="2",
        stream=False,
        complete=True,
        **fields,
    )


def test_entries_round_trip_across_writers_in_time_order(tmp_path):
    now = datetime.now(UTC)
    first, second = RequestLogWriter(tmp_path, "a", 30), RequestLogWriter(tmp_path, "b", 30)
    second.write(entry("r2", now))
    first.write(entry("r1", now - timedelta(seconds=5), prompt_tokens=9, completion_tokens=3))
    read = read_entries(tmp_path)
    assert [e.request_id for e in read.entries] == ["r1", "r2"] and read.unreadable == 0
    assert read.entries[0].prompt_tokens == 9
    assert read_entries(tmp_path, since=now - timedelta(seconds=1)).entries[0].request_id == "r2"


def test_a_torn_last_line_is_skipped_and_counted(tmp_path):
    writer = RequestLogWriter(tmp_path, "replica", 30)
    writer.write(entry("whole", datetime.now(UTC)))
    (path,) = tmp_path.glob("*.jsonl")
    with path.open("a") as f:
        f.write('{"request_id": "torn", "time": "2026-')  # a replica killed mid-write
    read = read_entries(tmp_path)
    assert [e.request_id for e in read.entries] == ["whole"] and read.unreadable == 1


def test_files_past_the_retention_are_removed_when_a_day_starts(tmp_path):
    old = tmp_path / f"requests-{date.today() - timedelta(days=8)}-x.jsonl"
    kept = tmp_path / f"requests-{date.today() - timedelta(days=6)}-x.jsonl"
    old.write_text("")
    kept.write_text("")
    RequestLogWriter(tmp_path, "new", retention_days=7).write(entry("r", datetime.now(UTC)))
    assert not old.exists() and kept.exists()


def test_writer_names_cannot_leave_the_log_directory(tmp_path):
    RequestLogWriter(tmp_path / "log", "../../etc/x", 30).write(entry("r", datetime.now(UTC)))
    assert [p.parent for p in tmp_path.rglob("*.jsonl")] == [tmp_path / "log"]


def test_key_ids_are_a_prefix_of_the_hash():
    assert key_id("sha256:" + "f" * 64) == key_id("f" * 64) == "f" * 12 and key_id(None) is None


def test_since_takes_durations_and_iso_times():
    assert parse_duration("90m") == timedelta(minutes=90) and parse_duration("soon") is None
    assert abs(parse_since("2h") - (datetime.now(UTC) - timedelta(hours=2))) < timedelta(seconds=5)
    assert parse_since("2026-11-29T10:00:00") == datetime(2026, 11, 29, 10, tzinfo=UTC)
    with pytest.raises(ValueError, match="duration"):
        parse_since("yesterday-ish")
