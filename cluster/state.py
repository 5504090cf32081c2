"""The state directory: everything a run writes (Ray storage, MLflow, models, logs, reports).

Resolved as: explicit argument, else $FEDFORGE_STATE_DIR, else ./.fedforge. Always made absolute,
because a `ray job submit` job runs in a temporary copy of the working directory that is deleted
when the job ends: pass `--state-dir "$PWD/.fedforge"` there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "FEDFORGE_STATE_DIR"
DEMO_MODEL_DIRNAME = "smollm2-135m-instruct"
TINY_MODEL_DIRNAME = "tiny-llama-h64"


@dataclass(frozen=True)
class StateDir:
    root: Path

    @classmethod
    def resolve(cls, explicit: str | os.PathLike | None = None) -> StateDir:
        chosen = explicit or os.environ.get(ENV_VAR) or ".fedforge"
        root = Path(chosen).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def demo_model(self) -> Path:
        return self.models / DEMO_MODEL_DIRNAME

    @property
    def tiny_model(self) -> Path:
        return self.models / TINY_MODEL_DIRNAME

    @property
    def ray_storage(self) -> Path:
        return self.root / "ray_results"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow" / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlflow" / "artifacts"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def default_tracking_uri(self) -> str:
        self.mlflow_db.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.mlflow_db}"
