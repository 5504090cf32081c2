"""The model registry: a thin layer over MLflow's client for LoRA adapter versions.

Default store: SQLite and local artifacts under the state dir; a tracking URI in the config
points at a real MLflow server instead. A version is registered all-or-nothing (if any step
after its creation fails, it is deleted again), old versions are never removed, and the
`production` alias keeps a history so `rollback` can move it back.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from cluster.config import RegistrySettings
from cluster.errors import UserError
from cluster.lineage import ARTIFACT_PATH_TAG, PRODUCTION_HISTORY_TAG, Lineage
from cluster.state import StateDir

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
PRODUCTION = "production"


class RegistryError(UserError):
    """A registry operation cannot be done as asked. The message is for users."""


@dataclass(frozen=True)
class VersionRecord:
    """One registered adapter version, as fedforge reads it back."""

    name: str
    version: str
    run_id: str
    source: str
    artifact_path: str
    lineage: Lineage

    @classmethod
    def of(cls, version: ModelVersion) -> VersionRecord:
        return cls(
            name=version.name,
            version=str(version.version),
            run_id=version.run_id,
            source=version.source,
            artifact_path=version.tags.get(ARTIFACT_PATH_TAG, ""),
            lineage=Lineage.from_tags(version.tags),
        )


def tracking_uri(settings: RegistrySettings, state: StateDir) -> str:
    """The configured MLflow server, else the SQLite store in the state dir."""
    return settings.tracking_uri or state.default_tracking_uri()


class Registry:
    def __init__(self, tracking_uri: str, artifact_root: Path | None = None):
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    @classmethod
    def from_settings(cls, settings: RegistrySettings, state: StateDir) -> Registry:
        """The registry a job's `registry` section names (artifacts in the state dir when the
        store is the default local one)."""
        if settings.tracking_uri:
            return cls(settings.tracking_uri)
        return cls(tracking_uri(settings, state), state.mlflow_artifacts)

    # -- runs ---------------------------------------------------------------------------------

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment:
            return experiment.experiment_id
        # An explicit location keeps artifacts in the state dir; otherwise MLflow writes them to
        # ./mlruns of the job's temporary working directory, which Ray deletes afterwards.
        location = self.artifact_root.as_uri() if self.artifact_root else None
        return self.client.create_experiment(name, artifact_location=location)

    @contextmanager
    def run(self, experiment: str, run_name: str, params: dict[str, str]) -> Iterator[str]:
        """An MLflow run that ends FINISHED, or FAILED when the body raises."""
        run = self.client.create_run(self._experiment_id(experiment), run_name=run_name)
        run_id = run.info.run_id
        self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        try:
            yield run_id
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        self.client.log_batch(
            run_id, metrics=[Metric(k, float(v), 0, step) for k, v in metrics.items()]
        )

    # -- versions -----------------------------------------------------------------------------

    def register_adapter(
        self,
        name: str,
        adapter_dir: Path,
        run_id: str,
        lineage: Lineage,
        alias: str | None = CANDIDATE,
    ) -> VersionRecord:
        """Upload `adapter_dir` to the run and register it as a new version of `name`."""
        artifact_path = f"adapter-{uuid.uuid4().hex[:12]}"
        # Artifacts first: a failure here leaves an orphan upload in the run, never a version.
        self.client.log_artifacts(run_id, str(adapter_dir), artifact_path)
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description="fedforge LoRA adapters")
        version = self.client.create_model_version(
            name,
            source=source,
            run_id=run_id,
            tags={**lineage.to_tags(), ARTIFACT_PATH_TAG: artifact_path},
        )
        try:
            if alias:
                self.client.set_registered_model_alias(name, alias, version.version)
        except BaseException:
            log.error(
                "registering %s v%s failed; removing the partial version", name, version.version
            )
            self.client.delete_model_version(name, version.version)
            raise
        return self.get(name, version.version)

    def versions(self, name: str) -> list[VersionRecord]:
        found = self.client.search_model_versions(f"name = '{name}'")
        return sorted((VersionRecord.of(v) for v in found), key=lambda v: int(v.version))

    def model_names(self) -> list[str]:
        return sorted(m.name for m in self.client.search_registered_models())

    def aliases(self, name: str) -> dict[str, str]:
        """Alias -> version number, as a string (stores disagree on int vs str)."""
        return {a: str(v) for a, v in self.client.get_registered_model(name).aliases.items()}

    def get(self, name: str, ref: str | int) -> VersionRecord:
        """A version by number (`3`) or by alias (`production`)."""
        try:
            if str(ref).isdigit():
                return VersionRecord.of(self.client.get_model_version(name, str(ref)))
            return VersionRecord.of(self.client.get_model_version_by_alias(name, str(ref)))
        except MlflowException:
            raise RegistryError(f"no version '{ref}' of model '{name}'") from None

    def download(self, name: str, ref: str | int, dst: Path) -> Path:
        """Download a version's adapter directory into `dst` and return its path."""
        from mlflow.artifacts import download_artifacts

        version = self.get(name, ref)
        dst.mkdir(parents=True, exist_ok=True)
        local = download_artifacts(
            run_id=version.run_id,
            artifact_path=version.artifact_path,
            dst_path=str(dst),
            tracking_uri=self.tracking_uri,
        )
        return Path(local)

    # -- aliases ------------------------------------------------------------------------------

    def _history(self, name: str) -> list[str]:
        history = json.loads(
            self.client.get_registered_model(name).tags.get(PRODUCTION_HISTORY_TAG, "[]")
        )
        return [str(v) for v in history]

    def _move_production(self, name: str, history: list[str]) -> None:
        previous = self._history(name)
        self.client.set_registered_model_tag(name, PRODUCTION_HISTORY_TAG, json.dumps(history))
        try:
            self.client.set_registered_model_alias(name, PRODUCTION, history[-1])
        except BaseException:
            self.client.set_registered_model_tag(name, PRODUCTION_HISTORY_TAG, json.dumps(previous))
            raise

    def promote(self, name: str, ref: str | int) -> ModelVersion:
        """Point `production` at a version (number or alias, e.g. `candidate`)."""
        version = self.get(name, ref)
        history = self._history(name)
        number = version.version
        if history and history[-1] == number:
            return version
        self._move_production(name, [*history, number])
        return version

    def rollback(self, name: str) -> ModelVersion:
        """Move `production` back to the version it pointed at before the last promote."""
        history = self._history(name)
        if len(history) < 2:
            raise RegistryError(f"'{name}' has no earlier production version to roll back to")
        self._move_production(name, history[:-1])
        return self.get(name, history[-2])
