"""scripts/gpu_check.sh --dry-run: the GPU check's configs are valid and its commands resolve,
on a machine without a GPU (the real check runs where one is lent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def dry_run(tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_DIR": str(tmp_path), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_dry_run_validates_the_configs_and_plans_every_stage(tmp_path):
    result = dry_run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in ("train-step", "finetune", "federated", "bench"):
        assert f"| {stage} | - | planned |" in result.stdout
    # The cut-down configs keep the GPU settings of the gpu profile.
    finetune = yaml.safe_load((tmp_path / "finetune.yaml").read_text())
    federated = yaml.safe_load((tmp_path / "federated.yaml").read_text())
    serve = yaml.safe_load((tmp_path / "serve.yaml").read_text())
    assert finetune["scaling"]["use_gpu"] and finetune["scaling"]["num_workers"] == 1
    assert federated["flower"]["gpus_per_supernode"] == 0.5
    assert federated["privacy"]["mode"] == "local_dp"
    assert serve["accelerator"] == "gpu"


@pytest.mark.integration  # runs the GPU check's training stage as a script, on the CPU
def test_the_training_step_stage_runs_and_reports_its_table(provisioned):
    # On the CPU here (--device cpu); on the GPU check it is the first stage, with --device cuda.
    result = subprocess.run(
        [
            sys.executable,
            "scripts/gpu_train_step.py",
            "--config",
            "configs/finetune/tiny.yaml",
            "--model",
            str(provisioned.tiny_model),
            "--device",
            "cpu",
            "--steps",
            "3",
            "--warmup",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| steps timed | step p50 ms |" in result.stdout
    assert "| 2 |" in result.stdout  # 3 steps, the first left out of the timing
