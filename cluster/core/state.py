"""The state directory: everything a run writes (Ray storage, MLflow, models, logs, reports).

Resolved as: explicit argument, else $FEDFORGE_STATE_DIR, else ./.fedforge. Always made absolute,
because a `ray job submit` job runs in a temporary copy of the working directory that is deleted
when the job ends: pass `--state-dir "$PWD/.fedforge"` there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cluster.core.errors import UserError

ENV_VAR = "FEDFORGE_STATE_DIR"
DEMO_MODEL_DIRNAME = "smollm2-135m-instruct"
TINY_MODEL_DIRNAME = "tiny-llama-h128"
DEMO, TINY = "demo", "tiny"  # names of the provisioned models in `model.base`


class ModelNotFoundError(UserError):
    """The configured base model is not where the config says."""


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

    @property
    def request_log(self) -> Path:
        """Where the endpoint logs its answers unless `request_log.dir` says otherwise."""
        return self.root / "serve" / "request-log"

    def default_tracking_uri(self) -> str:
        self.mlflow_db.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.mlflow_db}"

    def base_model(self, base: str) -> str:
        """A config's `model.base` as something `from_pretrained` and vLLM accept.

        'demo' and 'tiny' are the models provisioned in this state dir; a path must exist; any
        other string is a model-hub id. Training and serving both resolve through here, so a
        missing directory fails with this message before any engine or worker starts.
        """
        if base in (DEMO, TINY):
            path = self.demo_model if base == DEMO else self.tiny_model
            if not (path / "config.json").is_file():
                raise ModelNotFoundError(
                    f"the {base} model is not provisioned at {path}; run `scripts/setup.sh` "
                    f"(or `python -m llm.demo_model --tiny --state-dir {self.root}`) first"
                )
            return str(path)
        path = Path(base).expanduser()
        if path.is_dir():
            return str(path)
        if base.startswith((".", "/", "~")):
            raise ModelNotFoundError(f"model directory not found: {base}")
        return base
