"""API keys: loaded from an env var or a file, kept only as sha256 hashes, compared in constant
time. A key is never logged; `fedforge` prints hashes, never keys.

A request's bearer key is hashed once, into its `Caller`: the check, the caller's budgets and the
answer log all read that one hash.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse

from cluster.core.credentials import HASH_PREFIX, hash_api_key
from cluster.core.errors import UserError
from cluster.core.serve_config import AuthSettings
from serve.answers.errors import openai_error


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


def is_known(key_hash: str | None, key_hashes: tuple[str, ...]) -> bool:
    """True for the hash of a configured key, or when no keys are configured."""
    if not key_hashes:
        return True
    if key_hash is None:
        return False
    # Compare against every hash so timing does not tell which one was close.
    return any([hmac.compare_digest(key_hash, known) for known in key_hashes])


@dataclass(frozen=True)
class Caller:
    """Who sent a request, from the one hash of its bearer key."""

    key_hash: str | None  # None: no bearer key sent
    authorized: bool
    budget_id: str  # whose budgets the request spends


def identify(request: Request, key_hashes: tuple[str, ...]) -> Caller:
    """The request's caller. Budgets are its key's, or with no keys configured its address's
    (so made-up bearer strings cannot open fresh budgets)."""
    key_hash = bearer_hash(request.headers.get("authorization"))
    if key_hashes:
        return Caller(key_hash, is_known(key_hash, key_hashes), key_hash or "anonymous")
    address = request.client.host if request.client else "unknown"
    return Caller(key_hash, True, "addr:" + address)


def unauthorized() -> JSONResponse:
    return openai_error(
        401,
        "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
        code="invalid_api_key",
    )
