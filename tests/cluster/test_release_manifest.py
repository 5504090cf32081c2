"""The release manifest: nothing a version or its run releases escapes it. A planted file, tag,
metric or round field (a new feature that forgot to say how it is covered, or a registry writer)
is found; a DP version that carries what only runs without DP may write is flagged."""

from __future__ import annotations

import pytest

from cluster.records.lineage import Lineage
from cluster.records.privacy_record import PrivacyBudget
from cluster.records.release_manifest import (
    UnlistedRelease,
    check_registered,
    check_registration,
    job_log_lines,
    round_fields,
    unlisted,
)

DP = PrivacyBudget(mode="local_dp", epsilon=1.3, delta=1e-5)


def register(registry, stub_adapter, privacy: PrivacyBudget | None = DP):
    lineage = Lineage(
        kind="federated", base_model="tiny", metrics={"eval_accuracy": 0.5}, privacy=privacy
    )
    with registry.run("manifest", "manifest", {"config.name": "x"}) as run_id:
        registry.log_metrics(run_id, {"eval_accuracy": 0.5, "epsilon": 1.3})
        return registry.register_adapter("m", stub_adapter, run_id, lineage)


def test_a_registered_version_releases_only_what_the_manifest_lists(registry, stub_adapter):
    record = register(registry, stub_adapter)
    assert check_registered(registry, record) == []


def test_planted_files_tags_and_metrics_are_found(registry, stub_adapter):
    record = register(registry, stub_adapter)
    client = registry.client
    client.log_text(record.run_id, "{}", f"{record.artifact_path}/prompt_sketch.json")
    client.set_model_version_tag("m", record.version, "fedforge.member_hashes", "ab")
    client.log_metric(record.run_id, "client_0_loss", 0.4)
    client.log_metric(record.run_id, "train_loss", 0.4)  # only runs without DP may write it
    problems = check_registered(registry, record)
    assert "artifact 'prompt_sketch.json' is not in the release manifest" in problems
    assert "version_tag 'fedforge.member_hashes' is not in the release manifest" in problems
    assert "run_metric 'client_0_loss' is not in the release manifest" in problems
    assert any(
        p.startswith("run_metric 'train_loss' is released by a run under DP") for p in problems
    )
    assert len(problems) == 4


def test_registration_refuses_an_unlisted_file_before_uploading_anything():
    with pytest.raises(UnlistedRelease, match="artifact 'training_prompts.txt' is not in"):
        check_registration(["adapter_model.safetensors", "training_prompts.txt"], [], True)
    with pytest.raises(UnlistedRelease, match="'fedforge.metric.loss' is released by a run under"):
        check_registration(["adapter_model.safetensors"], ["fedforge.metric.loss"], True)
    check_registration(["adapter_model.safetensors"], ["fedforge.metric.loss"], False)


def test_round_log_and_job_log_under_dp_carry_no_loss_or_timing():
    line = {
        "round": 1, "clients": 2, "epsilon": 1.3, "train_loss": None, "seconds": None,
        "per_client": {"7": {"num_examples": 10, "partition": 0, "epsilon": 1.3, "steps": 2,
                             "train_loss": None, "train_seconds": None}},
    }  # fmt: skip
    assert unlisted("round_field", round_fields(line), private=True) == []
    leaky = {**line, "seconds": 12.2, "per_client": {"7": {"train_loss": 0.3}}}
    assert unlisted("round_field", round_fields(leaky), private=True) == [
        "round_field 'per_client.*.train_loss' is released by a run under DP (losses and "
        "timings (a client's compute time follows the examples it sampled))",
        "round_field 'seconds' is released by a run under DP (losses and timings (a client's "
        "compute time follows the examples it sampled))",
    ]
    log = "noise\n[fedforge] round 1: 2 clients, epsilon 1.3\n(pid=1) [fedforge] sample: hi\n"
    assert unlisted("log_line", job_log_lines(log), private=True) == [
        "log_line '[fedforge] sample: hi' is not in the release manifest"
    ]
