"""Credentials never reach serve/'s logs: URIs are redacted, also inside exception messages."""

from __future__ import annotations

import logging

import pytest

import serve.adapters
from cluster.core.credentials import redact
from serve.adapters import AdapterSource, AdapterWatcher


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://alice:s3cret@mlflow:5000/api", "http://***@mlflow:5000/api"),
        ("https://token@host/x and s3://k:v@bucket", "https://***@host/x and s3://***@bucket"),
        ("http://host/x?token=abc&run=1", "http://host/x?token=***&run=1"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("user@example.com wrote", "user@example.com wrote"),
    ],
)
def test_uri_credentials_are_redacted(text, expected):
    assert redact(text) == expected


def test_a_failed_registry_read_is_logged_without_the_uris_password(monkeypatch, caplog):
    uri = "http://alice:s3cret@127.0.0.1:1"

    def unreachable(registry, source):
        raise ConnectionError(f"cannot reach {uri}/api/2.0/mlflow/registered-models/search")

    monkeypatch.setattr(serve.adapters, "read_table", unreachable)
    monkeypatch.setattr(serve.adapters, "Registry", lambda tracking_uri: None)
    caplog.set_level(logging.ERROR, logger="serve.adapters")
    watcher = AdapterWatcher(AdapterSource(uri, cache_dir="", base_id="b", refresh_seconds=3600))
    watcher.stop()
    text = caplog.text
    assert "reading adapters from the registry failed" in text
    assert "s3cret" not in text and "http://***@127.0.0.1:1" in text
