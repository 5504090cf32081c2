"""Secrets stay out of what others can read: job runtime envs, logs, MLflow params and tags.

API keys travel and rest as `sha256:<hex>` (the endpoint compares hashes); URIs lose their
user:password before they are printed, logged or stored.
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit, urlunsplit

HASH_PREFIX = "sha256:"


def hash_api_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def redact_uri(uri: str) -> str:
    """`uri` without credentials: `http://user:secret@host/x` -> `http://***@host/x`."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))
