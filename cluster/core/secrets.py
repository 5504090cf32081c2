"""Secrets fedforge makes for itself (the example-id key, the audit signing key): written once,
0600 in a 0700 folder, atomically, so concurrent jobs that both find none end up sharing one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def secret_file(path: Path, make: Callable[[], bytes]) -> bytes:
    """The bytes at `path`, made with `make()` first if the file does not exist."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(make())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(staging, path)  # fails if another job made it first: theirs wins
        except FileExistsError:
            pass
        finally:
            staging.unlink()
    return path.read_bytes()
