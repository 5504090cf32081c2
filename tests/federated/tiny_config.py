"""The tiny federated config for tests: written to a temp file (absolute data path, optional
overrides) and loaded. A helper module, imported by tests; conftest.py only holds fixtures."""

from __future__ import annotations

from pathlib import Path

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
