"""API keys: loaded from an env var or a file, kept only as sha256 hashes, compared in constant
time. A key is never logged; `fedforge` prints hashes, never keys."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from cluster.core.credentials import HASH_PREFIX, hash_api_key
from cluster.core.errors import UserError
from cluster.core.serve_config import AuthSettings


class ApiKeyError(UserError):
    """No usable API key is configured. The message is for users."""


def _as_hash(entry: str) -> str:
    return entry if entry.startswith(HASH_PREFIX) else hash_api_key(entry)


def load_key_hashes(settings: AuthSettings, environ: dict[str, str] | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    entries = [e.strip() for e in environ.get(settings.api_keys_env, "").split(",")]
    if settings.api_keys_file:
        path = Path(settings.api_keys_file)
        if not path.is_file():
            raise ApiKeyError(f"API key file not found: {path}")
        entries += [line.strip() for line in path.read_text().splitlines()]
    hashes = sorted({_as_hash(e) for e in entries if e and not e.startswith("#")})
    if settings.required and not hashes:
        raise ApiKeyError(
            f"no API key configured: set ${settings.api_keys_env} or auth.api_keys_file "
            "(or auth.required: false for an open endpoint)"
        )
    return hashes


def bearer_hash(authorization: str | None) -> str | None:
    """The hash of the key in `Authorization: Bearer <key>`, None without one."""
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return hash_api_key(key.strip())


def is_authorized(authorization: str | None, key_hashes: list[str]) -> bool:
    """True for `Bearer <key>` whose hash is known, or when no keys are configured."""
    if not key_hashes:
        return True
    candidate = bearer_hash(authorization)
    if candidate is None:
        return False
    # Compare against every hash so timing does not tell which one was close.
    return any([hmac.compare_digest(candidate, known) for known in key_hashes])
