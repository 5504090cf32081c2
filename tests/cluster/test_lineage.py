"""The lineage record survives the trip through MLflow's string tags."""

from __future__ import annotations

from cluster.core.config import FinetuneConfig
from cluster.records.lineage import Lineage
from cluster.records.privacy_record import DataPrivacy, PrivacyBudget, PrivacyRecord, RoundPrivacy


def test_lineage_of_a_run_records_config_rank_and_environment():
    cfg = FinetuneConfig.model_validate(
        {"name": "run-a", "data": {"path": "x.jsonl"}, "lora": {"r": 32}}
    )
    lineage = Lineage.of_run(
        kind="finetune", config=cfg, dataset_digest="ab", metrics={"eval_accuracy": 0.5},
        validation_examples=7,
    )  # fmt: skip
    assert lineage.lora_rank == 32 and lineage.run_name == "run-a"
    assert len(lineage.config_sha256) == 64
    assert lineage.packages["torch"] and lineage.python
    assert Lineage.from_tags(lineage.to_tags()) == lineage


def test_privacy_budget_round_trips_including_no_dp():
    dp = PrivacyBudget(
        mode="local_dp", epsilon=2.994, delta=1e-5, noise_multiplier=1.1426,
        max_grad_norm=1.0, sample_rate=1 / 11, steps=20, accountant="rdp",
    )  # fmt: skip
    for privacy in (dp, PrivacyBudget(mode="none")):
        lineage = Lineage(kind="federated", base_model="demo", privacy=privacy)
        tags = lineage.to_tags()
        assert tags["fedforge.privacy.mode"] == privacy.mode
        assert Lineage.from_tags(tags).privacy == privacy


def test_per_source_privacy_round_trips():
    spent = {
        "ab/clients": DataPrivacy(epsilon=4.2, delta=1e-5, versions=["m:1"]),
        "ab/central": DataPrivacy(epsilon=None),
    }
    lineage = Lineage(kind="federated", base_model="demo", data_privacy=spent)
    assert Lineage.from_tags(lineage.to_tags()).data_privacy == spent


def test_tags_of_older_versions_still_read():
    lineage = Lineage.from_tags({"fedforge.kind": "finetune", "other": "x"})
    assert lineage.kind == "finetune" and lineage.lora_rank is None and lineage.metrics == {}


def test_privacy_record_file_round_trip(tmp_path):
    record = PrivacyRecord(
        mode="local_dp", epsilon=3.0, delta=1e-5,
        by_round=[RoundPrivacy(round=1, clients={"0": 2.0, "1": 3.0})],
    )  # fmt: skip
    record.write(tmp_path)
    assert PrivacyRecord.read(tmp_path) == record
    assert record.by_round[0].worst == 3.0
    assert record.budget == PrivacyBudget(mode="local_dp", epsilon=3.0, delta=1e-5)
    assert PrivacyRecord.read(tmp_path / "elsewhere") is None
