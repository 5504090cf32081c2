"""The boundary of every job module (`python -m llm.finetune ...`): user errors become one line.

    if __name__ == "__main__":
        run_job(main)

A `UserError` prints `error: <message>` on stderr and exits 2 (no traceback); SIGTERM (what
`ray job stop`, systemd and Kubernetes send) unwinds like Ctrl-C, so `finally` blocks and context
managers stop the processes a job started.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from cluster.core.errors import UserError

USER_ERROR_EXIT = 2


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_job(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a job's `main(argv)` and exit with its code (2 for a user error, 130 if stopped)."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("[fedforge] stopped", file=sys.stderr, flush=True)
        code = 130
    sys.exit(code or 0)
