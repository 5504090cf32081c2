"""A tiny federated config written to a temp file (absolute data path, optional overrides)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from federated.config import FederatedConfig, load_federated_config

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


@pytest.fixture
def tiny_config(tmp_path: Path) -> FederatedConfig:
    return load_federated_config(write_config(tmp_path))
