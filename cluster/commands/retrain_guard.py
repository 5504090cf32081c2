"""At most one retraining job per model and cooldown, whatever starts `fedforge drift retrain`
(a cron job firing twice, two operators, a retry after a failure).

A lock file held while the job runs (`<state>/retrain/<model>.lock`, an OS lock released when
the process dies, so a crash never leaves it stuck) makes a second start at the same moment
skip; a "started" marker written before the job (`<model>.started`, UTC time) makes any start
within the cooldown skip, whether the last job failed, is still waiting for the gate or was
promoted already.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from cluster.core.state import StateDir


def _folder(state: StateDir):
    folder = state.root / "retrain"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def only_retrain(state: StateDir, model: str) -> Iterator[bool]:
    """True while this process holds the model's retrain lock; False if another holds it."""
    with (_folder(state) / f"{model}.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def last_started(state: StateDir, model: str) -> datetime | None:
    marker = _folder(state) / f"{model}.started"
    try:
        return datetime.fromisoformat(marker.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def within_cooldown(state: StateDir, model: str, cooldown: timedelta) -> datetime | None:
    """When the last retrain started, if that is less than `cooldown` ago."""
    started = last_started(state, model)
    return started if started and datetime.now(UTC) - started < cooldown else None


def mark_started(state: StateDir, model: str) -> None:
    marker = _folder(state) / f"{model}.started"
    staging = marker.with_suffix(f".{os.getpid()}")
    staging.write_text(datetime.now(UTC).isoformat())
    os.replace(staging, marker)
