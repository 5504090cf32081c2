"""The promotion gate: the rule on its own, and applied to a registry."""

from __future__ import annotations

import shutil

import pytest

from cluster.commands.gate import decide, run_gate
from cluster.core.errors import UserError
from cluster.records.lineage import Lineage
from cluster.records.privacy_record import DataPrivacy
from cluster.records.registry import PRODUCTION, Registry, VersionRecord


def record(version: str, accuracy: float | None) -> VersionRecord:
    metrics = {} if accuracy is None else {"eval_accuracy": accuracy}
    lineage = Lineage(kind="test", base_model="tiny", metrics=metrics)
    return VersionRecord("m", version, "run", "src", "adapter-x", lineage)


def test_first_version_is_promoted_when_nothing_is_in_production():
    decision = decide([record("1", 0.5), record("2", 0.7)], current=None)
    assert decision.promote and decision.best.version == "2"
    assert decision.message == "promoted v2 (70.0%) over no production version"


def test_a_new_version_must_beat_production_strictly():
    current = record("1", 0.7)
    assert not decide([record("2", 0.7)], current).promote  # a tie keeps what is serving
    assert not decide([record("2", 0.6)], current).promote
    better = decide([record("2", 0.6), record("3", 0.71)], current)
    assert better.promote and better.best.version == "3"
    assert "over v1 (70.0%)" in better.message


def test_equal_candidates_prefer_the_earlier_one():
    assert decide([record("1", 0.8), record("2", 0.8)], None).best.version == "1"


def test_a_version_without_the_metric_cannot_be_judged():
    with pytest.raises(UserError, match="no 'eval_accuracy'"):
        decide([record("2", None)], None)


def test_run_gate_promotes_in_the_registry_it_is_given(migrated_mlflow_db, stub_adapter, tmp_path):
    shutil.copy(migrated_mlflow_db, tmp_path / "other.db")
    registry = Registry(f"sqlite:///{tmp_path / 'other.db'}", tmp_path / "artifacts")
    with registry.run("gate", "gate", {}) as run_id:
        versions = [
            registry.register_adapter("m", stub_adapter, run_id, record("0", acc).lineage)
            for acc in (0.4, 0.9)
        ]
    assert run_gate(registry, "m", versions).promote
    assert registry.aliases("m")[PRODUCTION] == "2"
    worse = run_gate(registry, "m", versions[:1])
    assert not worse.promote and worse.current.version == "2"


def budgeted(version: str, accuracy: float, epsilon: float | None) -> VersionRecord:
    spent = {"ab12/clients": DataPrivacy(epsilon=epsilon, delta=1e-5)}
    lineage = Lineage(
        kind="federated", base_model="tiny", metrics={"eval_accuracy": accuracy},
        data_privacy=spent,
    )  # fmt: skip
    return VersionRecord("m", version, "run", "src", "adapter-x", lineage)


def test_a_version_past_its_models_privacy_budget_is_never_promoted_and_the_gate_says_by_how_much():
    over, within = budgeted("2", 0.9, 6.6), budgeted("3", 0.8, 5.5)
    decision = decide([over, within], current=None, budget=6.0)
    assert decision.promote and decision.best.version == "3"  # the better one is refused
    assert "refused v2: its ancestry spent epsilon 6.600 of data ab12/clients, budget 6" in (
        decision.message
    )
    assert "(0.600 over)" in decision.message
    none_left = decide([over, budgeted("4", 0.95, None)], current=record("1", 0.5), budget=6.0)
    assert not none_left.promote and none_left.best is None
    assert none_left.message.startswith("kept v1 (50.0%); refused v2")
    assert "v4: its ancestry used data ab12/clients without differential privacy" in (
        none_left.message
    )
    assert decide([over], current=None).promote  # no budget set: nothing binds
