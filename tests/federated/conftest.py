"""A tiny federated config written to a temp file (absolute data path, optional overrides)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.core.config import load_config
from cluster.core.federated_config import FederatedConfig

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "federated" / "tiny.yaml"


def write_config(tmp_path: Path, **sections: dict) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["path"] = str(REPO / raw["data"]["path"])
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    path = tmp_path / "federated.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tiny(tmp_path: Path, **sections: dict) -> FederatedConfig:
    return load_config(write_config(tmp_path, **sections), FederatedConfig)


@pytest.fixture
def tiny_config(tmp_path: Path) -> FederatedConfig:
    return tiny(tmp_path)
