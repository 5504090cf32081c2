"""Fixtures of the federated tests (helpers they share live in tiny_config.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.core.federated_config import FederatedConfig
from tests.federated.tiny_config import tiny


@pytest.fixture
def tiny_config(tmp_path: Path) -> FederatedConfig:
    return tiny(tmp_path)
