"""Job configuration: pydantic models loaded from YAML, validated before any Ray work starts.

Every section forbids unknown keys, so a typo fails at load time with the file and the dotted
key in the message instead of half-way through a run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.core.errors import UserError


class ConfigError(UserError):
    """A configuration file is missing, unreadable or invalid. The message is meant for users."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(Section):
    base: str = Field(
        "demo",
        description="'demo' (SmolLM2-135M-Instruct provisioned by scripts/setup.sh), a local "
        "Hugging Face model directory, or a model-hub id.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype. Use float32 on CPU: bf16 compute flips near-ties."
    )


class DataSettings(Section):
    path: str = Field(description="JSONL or Parquet file, or a directory saved by `datasets`.")
    validation_fraction: float = Field(
        0.15, gt=0, lt=1, description="Share of examples held out for evaluation."
    )
    split_seed: int = Field(0, description="Seed of the deterministic train/validation split.")
    max_length: int = Field(128, ge=16, description="Tokens per example after truncation.")
    system_prompt: str | None = Field(
        None, description="Prepended as a system message when an example has none."
    )
    central_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of the training split that stays central (fine-tuning); federated "
        "clients hold the rest. 0 = one pool that every job uses.",
    )
    share: Literal["all", "central", "clients"] = Field(
        "all",
        description="Which training examples this job uses: 'all', the 'central' share, or "
        "the 'clients' share. The held-out split is the same for every share.",
    )

    @model_validator(mode="after")
    def _share_needs_a_fraction(self) -> DataSettings:
        if self.share != "all" and self.central_fraction == 0:
            raise ValueError(f"data.share '{self.share}' needs data.central_fraction > 0")
        return self


class LoraSettings(Section):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        description="Module names (suffixes) that receive LoRA matrices.",
    )


class TrainSettings(Section):
    max_steps: int = Field(40, ge=1, description="Optimizer steps in total (across resumes).")
    batch_size: int = Field(4, ge=1, description="Examples per worker per step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before a constant rate.")
    checkpoint_every: int = Field(10, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept by Ray Train.")
    report_every: int = Field(
        5,
        ge=1,
        description="Steps between ray.train.report calls (each is a barrier across workers); "
        "checkpoint steps always report. Progress lines are logged every step regardless.",
    )
    seed: int = Field(0, description="Seed for LoRA initialisation and data order.")


class ScalingSettings(Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker when true.")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs reserved per worker (torch threads).")
    max_failures: int = Field(1, ge=0, description="Worker-group restarts before the run fails.")


class EvalSettings(Section):
    max_examples: int = Field(60, ge=1, description="Held-out examples scored by generation.")
    max_new_tokens: int = Field(12, ge=1, description="Generated tokens per answer.")
    batch_size: int = Field(16, ge=1, description="Examples per generation batch.")


class RegistrySettings(Section):
    model_name: str = Field("fedforge-demo", description="Registered model name in MLflow.")
    experiment: str = Field("fedforge", description="MLflow experiment for training runs.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (e.g. http://mlflow:5000). Default: SQLite and local "
        "artifacts under the state directory.",
    )
    audit_key: str | None = Field(
        None,
        description="Ed25519 private key (PEM) that signs audit-log entries; keep it where the "
        "registry's writers cannot read it. Default: <state>/secrets/audit-signing.key, made on "
        "first use.",
    )
    audit_anchor: str | None = Field(
        None,
        description="Append-only file that receives every audit-log head, outside the MLflow "
        "store (another volume). Default: <state>/audit-anchor.log.",
    )


class CardSettings(Section):
    """What a version's model card says that no lineage can: written by people, for readers."""

    intended_use: str | None = Field(
        None, description="What the adapter is for (tasks, users, languages), in a sentence or two."
    )
    limitations: str | None = Field(
        None, description="Known failure modes, uses it is not fit for, and risks."
    )
    data_description: str | None = Field(
        None, description="Where the training data comes from, what it holds, and its licence."
    )


class TrainingJobConfig(Section):
    """The sections every job that produces an adapter shares (fine-tuning, federated rounds)."""

    name: str = Field(
        description="Run name: names its checkpoints or rounds under the state dir. Submitting "
        "again with the same name resumes the run.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
    )
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings
    lora: LoraSettings = Field(default_factory=LoraSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    card: CardSettings = Field(
        default_factory=CardSettings,
        description="Model card text for every version this job registers (optional).",
    )


class FinetuneConfig(TrainingJobConfig):
    train: TrainSettings = Field(default_factory=TrainSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)

    @model_validator(mode="after")
    def _warmup_fits_in_run(self) -> FinetuneConfig:
        if self.train.warmup_steps >= self.train.max_steps:
            raise ValueError(
                f"train.warmup_steps ({self.train.warmup_steps}) must be smaller than "
                f"train.max_steps ({self.train.max_steps})"
            )
        return self


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "<top level>"
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if error["type"] == "missing":
        return f"missing required key '{key}'"
    return f"key '{key}': {error['msg']}"


def load_config(path: str | Path, model: type[ConfigT]) -> ConfigT:
    """Read and validate a YAML config; every problem is reported with the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(f"  - {_describe(e)}" for e in exc.errors())
        raise ConfigError(f"{path}: invalid {model.__name__}:\n{problems}") from None


def dump_config(config: BaseModel, path: str | Path | None = None) -> str:
    """The config as YAML (what `load_config` reads back to an equal object); written to `path`
    atomically when one is given."""
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(text)
        os.replace(staging, path)
    return text


def config_hash(config: BaseModel) -> str:
    """Stable sha256 of a config's content (independent of YAML formatting and key order)."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
