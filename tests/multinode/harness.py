"""Helpers of the multi-node tests: job configs, the fedforge CLI, where a job's actors ran."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class LocalCluster:
    dashboard: str  # job submission / state API address
    gcs: str  # driver address
    tracking_uri: str  # the MLflow server
    head_node_id: str
    worker_node_ids: frozenset[str]


def job_config(stage: str, tmp_path: Path, cluster: LocalCluster, **sections) -> Path:
    """configs/<stage>/tiny.yaml with its registry pointed at the MLflow server and `sections`
    merged in (one level deep)."""
    raw = yaml.safe_load((REPO / "configs" / stage / "tiny.yaml").read_text())
    raw.setdefault("registry", {})["tracking_uri"] = cluster.tracking_uri
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def fedforge(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """The fedforge CLI as a user runs it, from the repository root (the jobs' working dir)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-c", "from cluster.commands.cli import main; main()", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


SUBMITTED = re.compile(r"submitted Ray job (\S+):")


def submission_ids(output: str) -> list[str]:
    return SUBMITTED.findall(output)


def job_actors(cluster: LocalCluster, submission_id: str) -> list:
    """Every actor (alive or dead) the job's driver created, with the node it ran on."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    info = JobSubmissionClient(cluster.dashboard).get_job_info(submission_id)
    assert info.driver_info is not None, info
    return list_actors(
        address=cluster.dashboard,
        filters=[("job_id", "=", info.driver_info.id)],
        detail=True,
        limit=10_000,
    )
