"""The main job's wiring without running its jobs: typed stage configs, one registry for all."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from cluster.commands.demo import PROFILES, Demo, Profile
from cluster.core.config import FinetuneConfig, load_config
from cluster.core.errors import UserError
from cluster.core.federated_config import FederatedConfig
from cluster.records.lineage import Lineage
from cluster.records.registry import PRODUCTION, Registry

REPO = Path(__file__).resolve().parents[2]


def profile_with(tmp_path: Path, tracking_uri: str | None, serve_uri: str | None = None) -> Profile:
    """The tiny profile's configs, their registry pointed at `tracking_uri`."""
    paths = []
    for stage, uri in (
        ("finetune", tracking_uri),
        ("federated", tracking_uri),
        ("serve", serve_uri),
    ):
        raw = yaml.safe_load((REPO / "configs" / stage / "tiny.yaml").read_text())
        raw.setdefault("registry", {})["tracking_uri"] = uri
        path = tmp_path / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(raw))
        paths.append(path)
    return Profile(*paths, requests=1)


def test_every_shipped_profile_loads_as_typed_configs(monkeypatch):
    monkeypatch.chdir(REPO)
    for profile in PROFILES.values():
        configs = profile.load()
        assert configs.finetune.registry.model_name == configs.federated.registry.model_name


def test_gate_reads_and_promotes_in_the_configured_store(
    empty_state, migrated_mlflow_db, stub_adapter, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)
    shutil.copy(migrated_mlflow_db, tmp_path / "second.db")
    second = f"sqlite:///{tmp_path / 'second.db'}"
    profile = profile_with(tmp_path, second, second)
    demo = Demo(profile, empty_state, tmp_path / "report")
    (tmp_path / "report").mkdir()
    store = Registry(second, tmp_path / "second-artifacts")
    with store.run("demo", "demo", {}) as run_id:
        for stage, accuracy in (("fine-tuned", 0.6), ("federated", 0.75)):
            lineage = Lineage(kind="test", base_model="tiny", metrics={"eval_accuracy": accuracy})
            demo.result.versions[stage] = store.register_adapter(
                demo.model_name, stub_adapter, run_id, lineage
            )
    demo.gate()
    assert store.aliases(demo.model_name)[PRODUCTION] == "2"
    assert demo.result.gate.promote
    default = Registry(empty_state.default_tracking_uri())
    assert default.model_names() == []  # the local store was never touched


def test_stages_that_disagree_on_the_store_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    profile = profile_with(tmp_path, "sqlite:///one.db", "sqlite:///two.db")
    with pytest.raises(UserError, match="must share registry.tracking_uri"):
        profile.load()


def test_stage_configs_are_written_typed_and_read_back_equal(empty_state, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    (tmp_path / "report").mkdir()
    demo = Demo(PROFILES["tiny"], empty_state, tmp_path / "report")
    written = demo._config_file("federated", demo.configs.federated)
    assert load_config(written, FederatedConfig) == demo.configs.federated
    assert load_config(demo._config_file("finetune", demo.configs.finetune), FinetuneConfig)
