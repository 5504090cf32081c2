"""Shared fixtures: a per-test state dir that reuses the models provisioned by scripts/setup.sh."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.state import StateDir
from llm.demo_model import provision, provision_tiny

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def provisioned() -> StateDir:
    """The repository's state dir with the demo and tiny models (built once if missing)."""
    state = StateDir.resolve(REPO / ".fedforge")
    provision(state)
    provision_tiny(state)
    return state


@pytest.fixture
def state(tmp_path: Path, provisioned: StateDir) -> StateDir:
    """A fresh state dir per test; its models/ links to the provisioned ones (read-only use)."""
    root = tmp_path / "state"
    root.mkdir()
    (root / "models").symlink_to(provisioned.models, target_is_directory=True)
    return StateDir.resolve(root)


@pytest.fixture(scope="session")
def demo_tokenizer(provisioned: StateDir):
    from llm.model import load_tokenizer

    return load_tokenizer(str(provisioned.demo_model))
