"""Secrets stay out of what others can read: job runtime envs, logs, MLflow params and tags.

API keys travel and rest as `sha256:<hex>` (the endpoint compares hashes). Text that may hold a
URI (a tracking URI, an exception message repeating one) loses its `user:password@` and secret
query values before it is printed, logged or stored.
"""

from __future__ import annotations

import hashlib
import re

HASH_PREFIX = "sha256:"
USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")
SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:password|passwd|pwd|token|access_token|api_key|apikey|secret|sig|signature"
    r"|key)=)[^&;#\s]+",
    re.IGNORECASE,
)


def hash_api_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def redact(text: object) -> str:
    """`text` with URI credentials (`user:pass@`, secret query values) replaced by `***`."""
    text = USERINFO.sub(r"\g<scheme>***@", str(text))
    return SECRET_QUERY.sub(r"\g<key>***", text)
