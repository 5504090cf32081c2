"""Signals reach the work: SIGTERM to `fedforge serve` (what systemd, Docker and Kubernetes send)
stops the endpoint and everything under it (the job process, the Ray head it started, Serve's
replicas, vLLM's engine), not just the wrapper."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from cluster.core.jobs import SERVE

pytestmark = [pytest.mark.slow, pytest.mark.integration]
REPO = Path(__file__).resolve().parents[2]
PORT = 8000  # configs/serve/tiny.yaml


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(condition, timeout: float, poll: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll)
    return False


def test_sigterm_to_fedforge_serve_leaves_no_process_and_frees_the_port(state, tmp_path):
    assert not _port_open(PORT), "another endpoint already holds the test port"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from cluster.commands.cli import main; main()", "serve", "--config",
         "configs/serve/tiny.yaml", "--state-dir", str(state.root)],
        cwd=REPO, stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT,
        env={**os.environ, "FEDFORGE_API_KEYS": "sk-signal-test", "RAY_ADDRESS": ""},
    )  # fmt: skip
    tree: list[psutil.Process] = []
    try:

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert _wait(ready, timeout=300, poll=2), (tmp_path / "serve.log").read_text()[-3000:]
        # Everything the command started, while it serves: job, Ray head, replicas, vLLM.
        tree = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert SERVE.module in names and "raylet" in names

        proc.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        proc.wait(timeout=60)
        assert _wait(lambda: not any(p.is_running() for p in tree) and not _port_open(PORT), 30)
        assert time.monotonic() - stopped_at < 30
        left = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert left == [], [" ".join(p.cmdline()) for p in left]
    finally:  # a failed assertion must not leave an endpoint behind for the next test
        for leftover in [*tree, psutil.Process(proc.pid)] if proc.poll() is None else tree:
            if leftover.is_running():
                leftover.kill()
