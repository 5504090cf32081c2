"""Publishing a trained adapter: held-out evaluation, lineage, registration. One path for every
job that produces an adapter (fine-tuning, federated rounds), so each version carries the same
record whichever job made it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cluster.config import TrainingJobConfig, dump_config
from cluster.lineage import CONFIG_FILE, TRAINING_PROFILE_FILE, Lineage, recorded_config
from cluster.privacy_record import DataPrivacy, PrivacyBudget, data_source
from cluster.prompt_features import prompt_text, training_profile
from cluster.registry import Registry, VersionRecord
from llm.data import dataset_sha256, load_split
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


def publish_adapter(
    registry: Registry,
    run_id: str,
    cfg: TrainingJobConfig,
    model_path: str,
    adapter_dir: Path,
    *,
    kind: str,
    metrics: dict[str, float] | None = None,
    privacy: PrivacyBudget | None = None,
    data_privacy: dict[str, DataPrivacy] | None = None,
) -> Published:
    """Evaluate base and adapter on the held-out split, log the metrics to the run, and register
    the adapter (alias `candidate`) with its lineage. Without `data_privacy` the job used its
    data share without differential privacy, and the lineage says so."""
    print("[fedforge] evaluating base model and adapter on held-out examples", flush=True)
    base = evaluate_heldout(cfg, model_path, None)
    tuned = evaluate_heldout(cfg, model_path, adapter_dir)
    all_metrics = {**tuned.as_metrics(), "base_accuracy": base.accuracy, **(metrics or {})}
    registry.log_metrics(run_id, all_metrics)
    sha = dataset_sha256(cfg.data.path)
    lineage = Lineage.of_run(
        kind=kind,
        config=cfg,
        dataset_sha256=sha,
        metrics=all_metrics,
        validation_examples=tuned.examples,
        privacy=privacy,
        data_privacy=data_privacy or {data_source(sha, cfg.data.share): DataPrivacy(epsilon=None)},
    )
    version = registry.register_adapter(
        cfg.registry.model_name,
        adapter_dir,
        run_id,
        lineage,
        files={
            CONFIG_FILE: dump_config(recorded_config(cfg)),
            TRAINING_PROFILE_FILE: training_profile(
                [prompt_text(e.prompt_messages) for e in load_split(cfg.data).train]
            ),
        },
    )
    return Published(version, base, tuned)
