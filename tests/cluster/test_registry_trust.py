"""The registry under the failures a real deployment sees: a registration killed at any step,
concurrent first registrations and alias moves, deleted versions, tampered records."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from cluster.records.lineage import ARTIFACT_PATH_TAG, CONFIG_FILE, Lineage
from cluster.records.registry import CANDIDATE, PRODUCTION, Registry, RegistryError

REPO = Path(__file__).resolve().parents[2]
LINEAGE = Lineage(kind="test", base_model="tiny", lora_rank=4)
# Before any version exists, after it is created, after the alias moved, at the last step.
STEPS = (
    "log_artifacts",
    "create_model_version",
    "set_registered_model_alias",
    "set_model_version_tag",
)


@pytest.fixture
def adapter(stub_adapter) -> Path:
    return stub_adapter


def register(registry: Registry, adapter: Path, name: str = "m", **kwargs):
    with registry.run("trust", name, {}) as run_id:
        return registry.register_adapter(name, adapter, run_id, LINEAGE, **kwargs)


@pytest.mark.parametrize("step", STEPS)
def test_a_registration_killed_at_any_step_leaves_no_usable_version(step, registry, adapter):
    register(registry, adapter)  # v1, complete and candidate
    killed = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from mlflow import MlflowClient
        from cluster.records.lineage import Lineage
        from cluster.records.registry import Registry

        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)  # no except, no finally: a real kill

        setattr(MlflowClient, {step!r}, die)
        registry = Registry({registry.tracking_uri!r}, Path({str(registry.artifact_root)!r}))
        with registry.run("trust", "killed", {{}}) as run_id:
            lineage = Lineage(kind="test", base_model="tiny")
            registry.register_adapter("m", Path({str(adapter)!r}), run_id, lineage,
                                      files={{"{CONFIG_FILE}": "x: 1"}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", killed], cwd=REPO, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]

    assert [v.version for v in registry.versions("m")] == ["1"]  # nothing half-made is listed
    if step == "set_model_version_tag":  # killed after the alias moved: it names a pending one
        with pytest.raises(RegistryError, match="incomplete"):
            registry.get("m", CANDIDATE)
        with pytest.raises(RegistryError, match="incomplete"):
            registry.promote("m", CANDIDATE)
    else:
        assert registry.get("m", CANDIDATE).version == "1"
    after = register(registry, adapter)  # the next registration works and is complete
    assert registry.get("m", CANDIDATE) == after
    assert registry.versions("m")[-1] == after


def test_concurrent_first_registrations_of_a_name_both_land(empty_state, adapter):
    results, errors = [], []

    def one() -> None:
        try:  # a registry object per thread, as separate jobs would have
            mine = Registry(empty_state.default_tracking_uri(), empty_state.mlflow_artifacts)
            results.append(register(mine, adapter, name="fresh"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    Registry(empty_state.default_tracking_uri())  # create the store once, as deploy does
    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r.version for r in results) == ["1", "2"]


def test_concurrent_promotes_keep_alias_and_history_consistent(registry, adapter):
    versions = [register(registry, adapter).version for _ in range(4)]
    threads = [threading.Thread(target=registry.promote, args=("m", v)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    history = registry._production("m")
    assert sorted(history) == versions  # every promote recorded once
    assert registry.aliases("m")[PRODUCTION] == history[-1]


def test_rollback_skips_deleted_versions_and_says_so(registry, adapter):
    v1, v2, v3 = (register(registry, adapter) for _ in range(3))
    for v in (v1, v2, v3):
        registry.promote("m", v.version)
    registry.client.delete_model_version("m", v2.version)
    assert registry.rollback("m") == (v1, [v2.version])
    assert registry.aliases("m")[PRODUCTION] == v1.version
    with pytest.raises(RegistryError, match="no earlier production version"):
        registry.rollback("m")


def test_promote_and_rollback_follow_an_alias_moved_outside_fedforge(registry, adapter):
    v1, v2, v3 = (register(registry, adapter) for _ in range(3))
    registry.promote("m", v1.version)
    registry.client.set_registered_model_alias("m", PRODUCTION, v2.version)  # e.g. MLflow's UI
    assert registry.promote("m", v2.version) == v2  # already there: nothing to do
    registry.promote("m", v3.version)
    assert registry.rollback("m")[0] == v2  # back to what really served before v3


def test_names_and_artifact_paths_are_checked(registry, adapter):
    for bad in ("a:b", "../up", "", "x/y"):
        with pytest.raises(RegistryError, match="not allowed"):
            register(registry, adapter, name=bad)
    good = register(registry, adapter)
    registry.client.set_model_version_tag("m", good.version, ARTIFACT_PATH_TAG, "../../etc")
    assert registry.versions("m") == []  # skipped, with a warning, not a crash
    with pytest.raises(RegistryError, match="invalid artifact path"):
        registry.get("m", good.version)


def test_the_job_config_is_a_file_beside_the_adapter_not_a_tag(registry, adapter):
    text = "name: run\n" + "data: {path: x.jsonl}\n" * 400  # well past MLflow's tag limit
    record = register(registry, adapter, files={CONFIG_FILE: text})
    assert registry.read_text(record, CONFIG_FILE) == text
    raw = registry.client.get_model_version("m", record.version)
    assert max(len(v) for v in raw.tags.values()) < 1000


@pytest.mark.parametrize("tamper", ["edit weights", "add a file", "remove a file"])
def test_a_download_whose_files_differ_from_the_registered_digest_is_refused(
    registry, adapter, empty_state, tmp_path, tamper
):
    record = register(registry, adapter, files={CONFIG_FILE: "name: run\n"})
    assert len(record.adapter_sha256) == 64
    fine = registry.download("m", record.version, tmp_path / "fine")
    assert (fine / "adapter_model.safetensors").read_bytes() == b"stub"

    (stored,) = empty_state.mlflow_artifacts.rglob(f"{record.artifact_path}/adapter_model.*")
    if tamper == "edit weights":  # another tenant's weights swapped in under this version
        stored.write_bytes(b"other tenant")
    elif tamper == "add a file":
        (stored.parent / "extra.safetensors").write_bytes(b"x")
    else:
        stored.unlink()
    with pytest.raises(RegistryError, match="do not match its registered digest"):
        registry.download("m", record.version, tmp_path / "tampered")


def test_one_malformed_record_never_hides_the_others(registry, adapter, caplog):
    """Through MLflow's own API: a model named with a quote, a version with a metric tag that
    is not a number and one with broken JSON. Listing, reading and serving go on without them,
    and each is named once in the log however often the registry is read."""
    good = register(registry, adapter)
    bad_metric, bad_json = register(registry, adapter), register(registry, adapter)
    client = registry.client
    client.set_model_version_tag("m", bad_metric.version, "fedforge.metric.eval_accuracy", "high")
    client.set_model_version_tag("m", bad_json.version, "fedforge.data_privacy", "{not json")
    client.create_registered_model("x'y")
    with caplog.at_level("WARNING", logger="cluster.records.registry"):
        for _ in range(3):  # a replica's refreshes
            assert registry.model_names() == ["m"]
            assert [v.version for v in registry.versions("m")] == [good.version]
    named = [r.getMessage() for r in caplog.records]
    assert sum("x'y" in m for m in named) == 1
    assert sum(f"version {bad_metric.version} of 'm' has a malformed" in m for m in named) == 1
    with pytest.raises(RegistryError, match=f"version {bad_json.version} of 'm' has a malformed"):
        registry.get("m", bad_json.version)


def test_every_model_is_listed_past_one_search_page(registry, adapter):
    with registry.run("trust", "many", {}) as run_id:
        for i in range(105):  # MLflow returns 100 registered models per page by default
            registry.client.create_registered_model(f"model-{i:03d}")
        registry.register_adapter("model-104", adapter, run_id, LINEAGE)
    names = registry.model_names()
    assert len(names) == 105 and names[-1] == "model-104"


def test_the_production_history_tag_stays_small_however_many_moves(registry, adapter):
    """A tag holds 5,000 characters on PostgreSQL and MySQL stores: the history kept in it is
    bounded, and rollback still steps back through the latest moves."""
    from cluster.records.lineage import PRODUCTION_HISTORY_TAG
    from cluster.records.registry import PRODUCTION_HISTORY_KEPT

    v1, v2 = register(registry, adapter).version, register(registry, adapter).version
    history = [v1, v2] * PRODUCTION_HISTORY_KEPT  # as if 400 moves had been made
    registry._move_production("m", history)
    kept = registry.client.get_registered_model("m").tags[PRODUCTION_HISTORY_TAG]
    assert len(kept) < 5000
    target, _ = registry.rollback("m")
    assert target.version == v1
