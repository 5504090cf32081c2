"""Every command finds the state dir the same way: --state-dir, else $FEDFORGE_STATE_DIR, else
./.fedforge; so a job trains into the directory `fedforge registry` reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cluster.commands.demo
import cluster.commands.privacy
import cluster.core.job_runner
from cluster.commands.cli import app
from cluster.core.config import RegistrySettings
from cluster.core.jobs import FEDERATE, FINETUNE, PRIVACY_AUDIT, PROVISION, SERVE
from cluster.core.state import StateDir
from cluster.records.lineage import Lineage
from cluster.records.registry import Registry

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture
def launched(monkeypatch, tmp_path) -> list[tuple[str, list[str]]]:
    """Record the job modules the CLI would run, instead of running them."""
    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(
        cluster.core.job_runner, "run_local", lambda module, args: calls.append((module, args)) or 0
    )
    monkeypatch.setattr(
        cluster.commands.demo,
        "run_demo",
        lambda profile, state, *a: calls.append(("demo", [str(state.root)])) or 0,
    )
    monkeypatch.chdir(tmp_path)  # where ./.fedforge would land
    return calls


def _state_dir_of(args: list[str]) -> str:
    return args[args.index("--state-dir") + 1]


def test_jobs_and_registry_honour_the_env_var(launched, monkeypatch, tmp_path, stub_adapter):
    env_dir = tmp_path / "from-env"
    monkeypatch.setenv("FEDFORGE_STATE_DIR", str(env_dir))
    for command in ("finetune", "federate", "serve"):
        result = runner.invoke(app, [command, "--config", "job.yaml"])
        assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["demo", "--profile", "tiny"]).exit_code == 0
    modules = [module for module, _ in launched]
    assert modules == [*(j.module for j in (FINETUNE, FEDERATE, SERVE, PROVISION)), "demo"]
    assert {_state_dir_of(args) for _, args in launched[:4]} == {str(env_dir)}
    assert launched[4][1] == [str(env_dir)]

    # The registry commands read the store the jobs write to.
    state = StateDir.resolve(env_dir)
    registry = Registry.from_settings(RegistrySettings(), state)
    with registry.run("t", "t", {}) as run_id:
        registry.register_adapter(
            "env-model", stub_adapter, run_id, Lineage(kind="test", base_model="tiny")
        )
    listing = runner.invoke(app, ["registry", "list"])
    assert "env-model" in listing.output
    assert not (tmp_path / ".fedforge").exists()


def test_the_flag_beats_the_env_var_and_the_default_is_local(launched, monkeypatch, tmp_path):
    monkeypatch.setenv("FEDFORGE_STATE_DIR", str(tmp_path / "from-env"))
    runner.invoke(app, ["finetune", "--config", "job.yaml", "--state-dir", "flagged"])
    monkeypatch.delenv("FEDFORGE_STATE_DIR")
    runner.invoke(app, ["finetune", "--config", "job.yaml"])
    assert [_state_dir_of(args) for _, args in launched] == [
        str(tmp_path / "flagged"),
        str(tmp_path / ".fedforge"),
    ]


@pytest.mark.integration  # runs the real job module in a child process (imports torch and Ray)
def test_a_real_job_reports_the_env_state_dir_it_looked_in(tmp_path):
    """No mock: `fedforge finetune` runs the job module, which looks for the model where the
    env var says and names that place in a one-line error."""
    env_dir = tmp_path / "from-env"
    proc = subprocess.run(
        [sys.executable, "-c", "from cluster.commands.cli import main; main()", "finetune",
         "--config", str(REPO / "configs/finetune/tiny.yaml")],
        cwd=REPO, capture_output=True, text=True, timeout=180,
        env={**os.environ, "FEDFORGE_STATE_DIR": str(env_dir), "RAY_ADDRESS": ""},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"the tiny model is not provisioned at {env_dir}/models/" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_privacy_audit_runs_the_audit_job_with_its_options(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(
        cluster.commands.privacy,
        "run_local",
        lambda module, args: calls.append((module, args)) or 0,
    )
    monkeypatch.setenv("FEDFORGE_STATE_DIR", str(tmp_path / "s"))
    result = runner.invoke(app, ["privacy", "audit", "--config", "f.yaml", "--canaries", "64"])
    assert result.exit_code == 0, result.output
    assert calls == [
        (
            PRIVACY_AUDIT.module,
            ["--config", "f.yaml", "--state-dir", str(tmp_path / "s"), "--canaries", "64"],
        )
    ]
