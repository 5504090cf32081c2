"""End to end: the main job (`fedforge demo`) on the tiny profile, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.registry import CANDIDATE, Registry

pytestmark = [pytest.mark.slow, pytest.mark.integration]
REPO = Path(__file__).resolve().parents[1]


def test_demo_fine_tunes_registers_and_evaluates_from_the_registry(state):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from cluster.cli import main; main()",
            "demo",
            "--profile",
            "tiny",
            "--state-dir",
            str(state.root),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "stage 1/2: fine-tune" in out and "stage 2/2" in out
    assert "fedforge-tiny v1 (from registry)" in out
    assert "demo finished in" in out

    registry = Registry(state.default_tracking_uri())
    assert registry.aliases("fedforge-tiny") == {CANDIDATE: "1"}
    report = json.loads((state.reports / "fedforge-tiny-v1-eval.json").read_text())
    assert report["examples"] == 16
    assert set(report["adapter"]) == {"loss", "perplexity", "accuracy"}
