"""Shared fixtures: state dirs per test, with the provisioned models only where a test needs them.

- `empty_state`: a fresh state dir with no models (registry, config and CLI tests);
- `state`: a fresh state dir whose models/ links to the ones scripts/setup.sh provisioned.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cluster.core.state import StateDir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def provisioned() -> StateDir:
    """The repository's state dir with the demo and tiny models (built once if missing)."""
    from llm.demo_model import provision, provision_tiny

    state = StateDir.resolve(REPO / ".fedforge")
    provision(state)
    provision_tiny(state)
    return state


@pytest.fixture(scope="session")
def migrated_mlflow_db(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, created once: creating one runs ~40 schema migrations."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def empty_state(tmp_path: Path, migrated_mlflow_db: Path) -> StateDir:
    """A fresh state dir: no models, an empty registry store."""
    state = StateDir.resolve(tmp_path / "state")
    state.mlflow_db.parent.mkdir(parents=True)
    shutil.copy(migrated_mlflow_db, state.mlflow_db)
    return state


@pytest.fixture
def state(empty_state: StateDir, provisioned: StateDir) -> StateDir:
    """A fresh state dir; its models/ links to the provisioned ones (read-only use)."""
    (empty_state.root / "models").symlink_to(provisioned.models, target_is_directory=True)
    return empty_state


@pytest.fixture
def registry(empty_state: StateDir):
    """The empty state dir's registry, as every job and command opens it (SQLite store, local
    artifacts, audit log signed and anchored under the state dir)."""
    from cluster.core.config import RegistrySettings
    from cluster.records.registry import Registry

    return Registry.from_settings(RegistrySettings(), empty_state)


@pytest.fixture
def stub_adapter(tmp_path: Path) -> Path:
    """A stub adapter directory (files named like an adapter's, not loadable): for tests of the
    registry and routing, which store and move adapters but never load them."""
    adapter = tmp_path / "stub-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    (adapter / "adapter_model.safetensors").write_bytes(b"stub")
    return adapter


@pytest.fixture(scope="session")
def demo_tokenizer(provisioned: StateDir):
    from llm.model import load_tokenizer

    return load_tokenizer(str(provisioned.demo_model))
