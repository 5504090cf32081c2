"""Secrets never reach what others can read: job envs, MLflow params, registered configs."""

from __future__ import annotations

import hashlib

from cluster.core.config import FinetuneConfig, config_hash
from cluster.core.credentials import hash_api_key, redact
from cluster.records.lineage import Lineage, recorded_config
from cluster.records.registry import Registry

SECRET_URI = "https://alice:s3cret@mlflow.example.org:5000/path?x=1"


def test_uris_lose_their_credentials_and_nothing_else():
    assert redact(SECRET_URI) == "https://***@mlflow.example.org:5000/path?x=1"
    assert redact("http://mlflow:5000") == "http://mlflow:5000"
    assert redact("sqlite:////srv/state/mlflow.db") == "sqlite:////srv/state/mlflow.db"


def test_api_keys_are_sent_as_hashes():
    assert hash_api_key("sk-1") == "sha256:" + hashlib.sha256(b"sk-1").hexdigest()


def test_a_run_records_its_config_without_the_tracking_password(empty_state):
    from llm.publish import tracked_run

    cfg = FinetuneConfig.model_validate(
        {"name": "r", "data": {"path": "x.jsonl"}, "registry": {"tracking_uri": SECRET_URI}}
    )
    registry = Registry(empty_state.default_tracking_uri(), empty_state.mlflow_artifacts)
    with tracked_run(registry, cfg) as run_id:
        params = registry.client.get_run(run_id).data.params
    assert params["config.registry.tracking_uri"] == redact(SECRET_URI)
    assert not any("s3cret" in value for value in params.values())
    lineage = Lineage.of_run(
        kind="finetune", config=cfg, dataset_digest="-", metrics={}, validation_examples=1
    )
    assert "s3cret" not in str(lineage.to_tags())
    assert lineage.config_sha256 == config_hash(recorded_config(cfg))
