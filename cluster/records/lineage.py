"""Lineage of a registered adapter version: what it was made from, how, and where.

This module names every tag fedforge writes to MLflow. A version's lineage is one typed record,
`Lineage`, stored as string tags (`fedforge.<field>`, `fedforge.metric.<name>`,
`fedforge.privacy.<field>`) so the MLflow UI and `fedforge registry show` show the same thing;
reading a version gives the record back, never a dict of strings.
"""

from __future__ import annotations

import json
import platform
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cluster.core.config import TrainingJobConfig, config_hash
from cluster.core.credentials import redact
from cluster.core.environment import git_revision, package_versions
from cluster.records.privacy_record import DataPrivacy, PrivacyBudget

TAG_PREFIX = "fedforge."
METRIC_PREFIX = TAG_PREFIX + "metric."
PRIVACY_PREFIX = TAG_PREFIX + "privacy."
# Kept by the registry itself: where a version's files sit in its run, and the alias history.
ARTIFACT_PATH_TAG = TAG_PREFIX + "artifact_path"
PRODUCTION_HISTORY_TAG = TAG_PREFIX + "production_history"
REGISTRATION_TAG = TAG_PREFIX + "registration"  # "pending" until its last step, then "complete"
GATE_TAG = TAG_PREFIX + "gate"  # on a version the gate judged: "<UTC time> <its decision>"
AUDIT_HEAD_TAG = TAG_PREFIX + "audit_head"  # on a model: "<seq> <sha256>" of its last log entry
PRIVACY_BUDGET_TAG = TAG_PREFIX + "privacy_budget"  # on a model: epsilon per data source
AUDIT_MODEL_TAG = TAG_PREFIX + "audit_model"  # on the MLflow run that holds a model's audit log
CONFIG_FILE = "fedforge_config.yaml"  # the job's config, registered beside the adapter
MODEL_CARD_FILE = "MODEL_CARD.md"  # the version's model card, registered beside the adapter
# Features of the training prompts (cluster.records.prompt_features): what drift compares with.
TRAINING_PROFILE_FILE = "training_profile.json"
# Which examples each run of the version's ancestry used, keyed (privacy_record.DataUses).
DATA_USES_FILE = "data_uses.json"
# Files the registry keeps beside an adapter's own; the adapter's digest covers the others.
REGISTRY_FILES = frozenset({CONFIG_FILE, MODEL_CARD_FILE, TRAINING_PROFILE_FILE, DATA_USES_FILE})
# sha256 (cluster.core.digest.tree_sha256) of the adapter's files, computed by the registry at
# registration and checked on every download: what an answer's X-Fedforge-Adapter header names.
ADAPTER_DIGEST_TAG = TAG_PREFIX + "adapter_sha256"
# A federated version's metric: adapter tensors moved between server and clients, in MB, over
# every round and both directions (FlowerTune reports communication beside accuracy).
COMMUNICATION_METRIC = "communication_mb"

JSON_FIELDS = {"packages", "data_privacy"}  # fields stored as one JSON tag


def recorded_config(config: BaseModel) -> BaseModel:
    """The config as it may be recorded (MLflow params, the registered config file, its hash):
    a tracking URI's credentials removed."""
    registry = getattr(config, "registry", None)
    if registry is None or not registry.tracking_uri:
        return config
    redacted = registry.model_copy(update={"tracking_uri": redact(registry.tracking_uri)})
    return config.model_copy(update={"registry": redacted})


class Lineage(BaseModel):
    """Everything recorded about one registered version. Fields a version predates stay unset."""

    model_config = ConfigDict(frozen=True)

    kind: str = Field(description="'finetune' or 'federated' (tests register 'test').")
    base_model: str = Field(description="The config's model.base the adapter was trained on.")
    run_name: str = ""
    lora_rank: int | None = Field(None, description="LoRA r: the engine must allow it.")
    dataset_digest: str = Field(
        "",
        description="HMAC-SHA256 of the data at data.path under the deployment's example key "
        "(cluster.core.example_ids): a plain hash or size of data that holds clients' examples "
        "would let anyone who holds the other examples test one for membership.",
    )
    config_sha256: str = Field(
        "", description=f"sha256 of the job config, registered beside the adapter as {CONFIG_FILE}."
    )
    metrics: dict[str, float] = Field(default_factory=dict)
    validation_examples: int | None = None
    privacy: PrivacyBudget | None = None
    data_privacy: dict[str, DataPrivacy] = Field(
        default_factory=dict,
        description="Data source -> epsilon composed over every run on it in the ancestry.",
    )
    git_revision: str = ""
    packages: dict[str, str] = Field(default_factory=dict)
    python: str = ""
    platform: str = ""

    @classmethod
    def of_run(
        cls,
        *,
        kind: str,
        config: TrainingJobConfig,
        dataset_digest: str,
        metrics: dict[str, float],
        validation_examples: int,
        privacy: PrivacyBudget | None = None,
        data_privacy: dict[str, DataPrivacy] | None = None,
    ) -> Lineage:
        """The lineage of a run of `config` (a fine-tune or federated config) made here, now."""
        return cls(
            kind=kind,
            base_model=config.model.base,
            run_name=config.name,
            lora_rank=config.lora.r,
            dataset_digest=dataset_digest,
            config_sha256=config_hash(recorded_config(config)),
            metrics=metrics,
            validation_examples=validation_examples,
            privacy=privacy,
            data_privacy=data_privacy or {},
            git_revision=git_revision(),
            packages=package_versions(),
            python=platform.python_version(),
            platform=platform.platform(),
        )

    def to_tags(self) -> dict[str, str]:
        tags: dict[str, str] = {}
        for key, value in self.model_dump(exclude={"metrics", "privacy"}).items():
            if value in (None, "", {}):
                continue
            tags[TAG_PREFIX + key] = (
                json.dumps(value, sort_keys=True) if key in JSON_FIELDS else str(value)
            )
        tags.update({METRIC_PREFIX + k: f"{v:.6g}" for k, v in self.metrics.items()})
        if self.privacy is not None:
            for key, value in self.privacy.model_dump().items():
                tags[PRIVACY_PREFIX + key] = str(value)
        return tags

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Lineage:
        fields: dict[str, Any] = {}
        metrics: dict[str, float] = {}
        privacy: dict[str, Any] = {}
        for key, value in tags.items():
            if key.startswith(METRIC_PREFIX):
                metrics[key.removeprefix(METRIC_PREFIX)] = float(value)
            elif key.startswith(PRIVACY_PREFIX):
                privacy[key.removeprefix(PRIVACY_PREFIX)] = None if value == "None" else value
            elif key.startswith(TAG_PREFIX):
                fields[key.removeprefix(TAG_PREFIX)] = value
        fields = {k: v for k, v in fields.items() if k in cls.model_fields}
        for key in JSON_FIELDS & fields.keys():
            fields[key] = json.loads(fields[key])
        fields.setdefault("kind", "unknown")
        fields.setdefault("base_model", "unknown")
        return cls(
            **fields,
            metrics=metrics,
            privacy=PrivacyBudget.model_validate(privacy) if privacy else None,
        )
