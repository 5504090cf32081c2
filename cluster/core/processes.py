"""Process hygiene shared by everything that starts long-lived child processes."""

from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1


def exit_with_parent() -> None:
    """For Popen's `preexec_fn`: the child gets SIGTERM when its parent dies, even by SIGKILL,
    so nothing a killed command or actor started keeps running."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
