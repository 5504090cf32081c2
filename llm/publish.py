"""Publishing a trained adapter: held-out evaluation, lineage, registration. One path for every
job that produces an adapter (fine-tuning, federated rounds), so each version carries the same
record whichever job made it.

Everything registered is listed in the release manifest (cluster.records.release_manifest).
What depends on training data is either inside the run's DP release, keyed
(cluster.core.example_ids), or made only from examples that no DP release in the version's
ancestry protects (the training profile).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cluster.core.config import TrainingJobConfig, dump_config
from cluster.core.example_ids import ExampleKey
from cluster.records.lineage import (
    CONFIG_FILE,
    DATA_USES_FILE,
    MODEL_CARD_FILE,
    TRAINING_PROFILE_FILE,
    Lineage,
    recorded_config,
)
from cluster.records.privacy_record import (
    DataPrivacy,
    DataUse,
    DataUses,
    PrivacyBudget,
    data_source,
)
from cluster.records.prompt_features import prompt_text, training_profile
from cluster.records.registry import Registry, VersionRecord
from cluster.records.release_manifest import check_registration
from llm.data import DatasetError, Example, example_content, load_split
from llm.evaluate import EvalResult, evaluate_heldout
from llm.run_identity import flatten


@dataclass(frozen=True)
class Published:
    version: VersionRecord
    base: EvalResult
    tuned: EvalResult


@contextmanager
def tracked_run(registry: Registry, cfg: TrainingJobConfig) -> Iterator[str]:
    """The job's MLflow run, its validated config logged as `config.<key>` parameters."""
    recorded = recorded_config(cfg).model_dump(mode="json")
    params = {"config." + k: v for k, v in flatten(recorded).items()}
    with registry.run(cfg.registry.experiment, cfg.name, params) as run_id:
        yield run_id


def own_source(cfg: TrainingJobConfig, key: ExampleKey) -> str:
    """The display name of the data this job trains on."""
    return data_source(key.file_digest(cfg.data.path), cfg.data.share)


def example_ids(cfg: TrainingJobConfig, key: ExampleKey) -> list[str]:
    """Keyed ids of the examples this job trains on (its share of the training split)."""
    return key.example_ids(example_content(e) for e in load_split(cfg.data).train)


def profile_examples(cfg: TrainingJobConfig, uses: list[DataUse], key: ExampleKey) -> list[Example]:
    """Examples the training profile may describe: it is released without noise, so never one
    that a DP release in the ancestry protects. A run without DP describes its own training
    examples; a run under DP, the central share of its data (what the server holds in clear)."""
    private = [u for u in uses if u.private]
    if any(u.key_id != key.key_id for u in private):
        return []  # some protected examples cannot be named: any of them could be protected
    protected = set().union(*(u.examples for u in private))
    own_private = any(u.private and not u.version for u in uses)
    data = cfg.data.model_copy(update={"share": "central"}) if own_private else cfg.data
    try:
        train = load_split(data).train
    except DatasetError:  # no central share
        return []
    return [e for e in train if key.example_id(example_content(e)) not in protected]


def registry_files(cfg: TrainingJobConfig, uses: list[DataUse], key: ExampleKey) -> dict[str, str]:
    """The files registered beside the adapter (name -> text), all but its model card: the
    config, the ancestry's data uses and, when any example may be described, the profile."""
    files = {
        CONFIG_FILE: dump_config(recorded_config(cfg)),
        DATA_USES_FILE: DataUses(uses=uses).model_dump_json(),
    }
    if profiled := profile_examples(cfg, uses, key):
        files[TRAINING_PROFILE_FILE] = training_profile(
            [prompt_text(e.prompt_messages) for e in profiled]
        )
    return files


def publish_adapter(
    registry: Registry,
    run_id: str,
    cfg: TrainingJobConfig,
    model_path: str,
    adapter_dir: Path,
    *,
    kind: str,
    key: ExampleKey,
    metrics: dict[str, float] | None = None,
    privacy: PrivacyBudget | None = None,
    uses: list[DataUse] | None = None,
    data_privacy: dict[str, DataPrivacy] | None = None,
    privacy_budget: float | None = None,
) -> Published:
    """Evaluate base and adapter on the held-out split, log the metrics to the run, and register
    the adapter (alias `candidate`) with its lineage.

    `uses` and `data_privacy` are the ancestry's data uses and what they spent per source
    (federated.privacy.ancestry); without them the job used its own share without DP and no
    ancestor.
    `privacy_budget` becomes the model's if it has none (Registry.register_adapter)."""
    print("[fedforge] evaluating base model and adapter on held-out examples", flush=True)
    base = evaluate_heldout(cfg, model_path, None)
    tuned = evaluate_heldout(cfg, model_path, adapter_dir)
    all_metrics = {**tuned.as_metrics(), "base_accuracy": base.accuracy, **(metrics or {})}
    registry.log_metrics(run_id, all_metrics)
    if uses is None:
        source = own_source(cfg, key)
        uses = [DataUse(source=source, rdp=None, key_id=key.key_id, examples=example_ids(cfg, key))]
        data_privacy = {source: DataPrivacy(epsilon=None, private=False)}
    lineage = Lineage.of_run(
        kind=kind,
        config=cfg,
        dataset_digest=key.file_digest(cfg.data.path),
        metrics=all_metrics,
        validation_examples=tuned.examples,
        privacy=privacy,
        data_privacy=data_privacy,
    )
    files = registry_files(cfg, uses, key)
    private = privacy is not None and privacy.mode != "none"
    adapter_files = [
        f.relative_to(adapter_dir).as_posix() for f in adapter_dir.rglob("*") if f.is_file()
    ]
    check_registration([*adapter_files, *files, MODEL_CARD_FILE], lineage.to_tags(), private)
    version = registry.register_adapter(
        cfg.registry.model_name, adapter_dir, run_id, lineage, files=files,
        privacy_budget=privacy_budget,
    )  # fmt: skip
    return Published(version, base, tuned)
