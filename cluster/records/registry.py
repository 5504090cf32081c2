"""The model registry: a thin layer over MLflow's client for LoRA adapter versions.

Default store: SQLite and local artifacts under the state dir; a tracking URI in the config
points at a real MLflow server instead. A version is registered all-or-nothing (if any step
after its creation fails, it is deleted again) with its model card beside the adapter
(`cluster/records/model_card.py`); versions are never removed unless `delete` is asked to; the
`production` alias keeps a history so `rollback` can move it back. Every register, promote,
rollback and delete is written to the model's audit log (`cluster/records/audit_log.py`) before the
alias moves or the version goes, so no change made through fedforge is missing from it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import re
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from cluster.core.config import RegistrySettings
from cluster.core.digest import tree_sha256
from cluster.core.errors import UserError
from cluster.core.state import StateDir
from cluster.records.audit_log import AuditEntry, AuditLog, LogCheck, sha256, utc_now
from cluster.records.audit_trust import AuditTrust
from cluster.records.lineage import (
    ADAPTER_DIGEST_TAG,
    ARTIFACT_PATH_TAG,
    CONFIG_FILE,
    GATE_TAG,
    MODEL_CARD_FILE,
    PRIVACY_BUDGET_TAG,
    PRODUCTION_HISTORY_TAG,
    REGISTRATION_TAG,
    REGISTRY_FILES,
    Lineage,
)
from cluster.records.model_card import lifecycle, render_card
from cluster.records.privacy_record import budget_overrun

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
PRODUCTION = "production"
PENDING, COMPLETE = "pending", "complete"  # values of REGISTRATION_TAG
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
ARTIFACT_PATH = re.compile(r"adapter-[0-9a-f]{12}")
PRODUCTION_HISTORY_KEPT = 200  # versions `rollback` can step back through


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
    adapter_sha256: str = ""  # "" for a version registered before adapters were digested

    @classmethod
    def of(cls, version: ModelVersion) -> VersionRecord:
        artifact_path = version.tags.get(ARTIFACT_PATH_TAG, "")
        if not ARTIFACT_PATH.fullmatch(artifact_path):  # it becomes a path in every cache
            raise RegistryError(
                f"version {version.version} of '{version.name}' has an invalid artifact path "
                f"{artifact_path!r}"
            )
        try:
            lineage = Lineage.from_tags(version.tags)
        except ValueError as exc:  # a malformed tag (pydantic's and json's errors are ValueErrors)
            raise RegistryError(
                f"version {version.version} of '{version.name}' has a malformed lineage tag "
                f"({type(exc).__name__})"
            ) from None
        return cls(
            name=version.name,
            version=str(version.version),
            run_id=version.run_id,
            source=version.source,
            artifact_path=artifact_path,
            lineage=lineage,
            adapter_sha256=version.tags.get(ADAPTER_DIGEST_TAG, ""),
        )


def tracking_uri(settings: RegistrySettings, state: StateDir) -> str:
    """The configured MLflow server, else the SQLite store in the state dir."""
    return settings.tracking_uri or state.default_tracking_uri()


class Registry:
    def __init__(
        self,
        tracking_uri: str,
        artifact_root: Path | None = None,
        trust: AuditTrust | None = None,
    ):
        """`trust` signs and anchors the audit logs outside the store (every job and command
        has it, through `from_settings`); without it the logs are hash-chained only."""
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self.trust = trust
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    @classmethod
    def from_settings(cls, settings: RegistrySettings, state: StateDir) -> Registry:
        """The registry a job's `registry` section names (artifacts in the state dir when the
        store is the default local one), with the deployment's audit trust."""
        trust = AuditTrust.from_settings(settings, state)
        if settings.tracking_uri:
            return cls(settings.tracking_uri, trust=trust)
        return cls(tracking_uri(settings, state), state.mlflow_artifacts, trust)

    # -- runs ---------------------------------------------------------------------------------

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment:
            return experiment.experiment_id
        # An explicit location keeps artifacts in the state dir; otherwise MLflow writes them to
        # ./mlruns of the job's temporary working directory, which Ray deletes afterwards.
        location = self.artifact_root.as_uri() if self.artifact_root else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:  # a concurrent job created it first
            if not _already_exists(exc):
                raise
        return self.client.get_experiment_by_name(name).experiment_id

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
        files: dict[str, str] | None = None,
        reason: str | None = None,
        privacy_budget: float | None = None,
    ) -> VersionRecord:
        """Upload `adapter_dir` (plus `files`, name -> text, beside it) to the run and register
        it as a new version of `name`, with its model card, logged in the audit trail.

        `privacy_budget` (the job config's) becomes the model's budget if it has none yet; a
        budget once set changes only through `set_privacy_budget`, never by a later config.

        The version is created `pending` and marked complete as the last step: a registration
        killed half-way leaves a version no reader serves or promotes, and the next one works.
        """
        check_model_name(name)
        files = files or {}
        if unknown := files.keys() - REGISTRY_FILES:
            raise RegistryError(f"files {sorted(unknown)} are not registry files")
        digest = tree_sha256(adapter_dir, exclude=REGISTRY_FILES)
        artifact_path = f"adapter-{uuid.uuid4().hex[:12]}"
        # Artifacts first: a failure here leaves an orphan upload in the run, never a version.
        self.client.log_artifacts(run_id, str(adapter_dir), artifact_path)
        for filename, text in files.items():
            self.client.log_text(run_id, text, f"{artifact_path}/{filename}")
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        try:
            self.client.create_registered_model(name, description="fedforge LoRA adapters")
        except MlflowException as exc:  # registered before, or by a concurrent first registration
            if not _already_exists(exc):
                raise
        tags = {
            **lineage.to_tags(),
            ARTIFACT_PATH_TAG: artifact_path,
            ADAPTER_DIGEST_TAG: digest,
            REGISTRATION_TAG: PENDING,
        }
        version = self.client.create_model_version(name, source=source, run_id=run_id, tags=tags)
        number, logged = str(version.version), False
        try:
            card = render_card(
                name=name,
                version=number,
                run_id=run_id,
                lineage=lineage,
                config_text=files.get(CONFIG_FILE),
                registered_at=utc_now(),
                adapter_sha256=digest,
            )
            self.client.log_text(run_id, card, f"{artifact_path}/{MODEL_CARD_FILE}")
            with self._alias_lock(name):
                self._adopt_budget(name, privacy_budget)
                previous = self.aliases(name).get(alias) if alias else None
                details = {
                    "run_id": run_id,
                    "kind": lineage.kind,
                    "adapter_sha256": digest,
                    "card_sha256": sha256(card),
                    **({"run_name": lineage.run_name} if lineage.run_name else {}),
                    **({"config_sha256": lineage.config_sha256} if lineage.config_sha256 else {}),
                }
                self._audit(name).append(
                    "register",
                    number,
                    alias=alias,
                    previous=previous,
                    new=number if alias else None,
                    reason=reason,
                    details=details,
                )
                logged = True
                if alias:
                    self.client.set_registered_model_alias(name, alias, number)
            self.client.set_model_version_tag(name, number, REGISTRATION_TAG, COMPLETE)
        except BaseException as exc:
            log.error("registering %s v%s failed; removing the partial version", name, number)
            self.client.delete_model_version(name, number)
            if logged:  # the log says what became of the version it announced
                self._log_quietly(name, "delete", number, f"registration failed: {exc!r}"[:200])
            raise
        return self.get(name, number)

    def versions(self, name: str) -> list[VersionRecord]:
        """The complete versions of `name`, oldest first; a malformed one is skipped (and named
        once in the log), never allowed to hide the others."""
        check_model_name(name)  # so the filter below cannot be broken out of
        records = []
        search = self.client.search_model_versions
        for version in _every_page(search, filter_string=f"name = '{name}'"):
            if not _is_complete(version):
                continue
            try:
                records.append(VersionRecord.of(version))
            except RegistryError as exc:
                _warn_once(f"skipping {exc}")
        return sorted(records, key=lambda v: int(v.version))

    def model_names(self) -> list[str]:
        """Every registered model fedforge could have registered (others, e.g. a name with a
        quote made through MLflow's own API, are skipped and named once in the log)."""
        names = []
        for model in _every_page(self.client.search_registered_models):
            if MODEL_NAME.fullmatch(model.name):
                names.append(model.name)
            else:
                _warn_once(f"skipping registered model {model.name!r}: not a fedforge name")
        return sorted(names)

    def aliases(self, name: str) -> dict[str, str]:
        """Alias -> version number, as a string (stores disagree on int vs str)."""
        return {a: str(v) for a, v in self.client.get_registered_model(name).aliases.items()}

    def get(self, name: str, ref: str | int) -> VersionRecord:
        """A complete version by number (`3`) or by alias (`production`)."""
        try:
            if str(ref).isdigit():
                version = self.client.get_model_version(name, str(ref))
            else:
                version = self.client.get_model_version_by_alias(name, str(ref))
        except MlflowException:
            raise RegistryError(f"no version '{ref}' of model '{name}'") from None
        if not _is_complete(version):
            raise RegistryError(
                f"version {version.version} of model '{name}' is incomplete: its registration "
                "did not finish (it is never served or promoted; register the adapter again)"
            )
        return VersionRecord.of(version)

    def download(self, name: str, ref: str | int, dst: Path) -> Path:
        """Download a version's adapter directory into `dst` and return its path, after checking
        its files against the digest recorded at registration (so what is loaded is what was
        registered, whichever store or cache it came through)."""
        from mlflow.artifacts import download_artifacts

        version = self.get(name, ref)
        dst.mkdir(parents=True, exist_ok=True)
        local = Path(
            download_artifacts(
                run_id=version.run_id,
                artifact_path=version.artifact_path,
                dst_path=str(dst),
                tracking_uri=self.tracking_uri,
            )
        )
        if version.adapter_sha256:
            found = tree_sha256(local, exclude=REGISTRY_FILES)
            if found != version.adapter_sha256:
                raise RegistryError(
                    f"the files of '{name}' v{version.version} do not match its registered "
                    f"digest (sha256 {found[:16]}..., registered {version.adapter_sha256[:16]}...):"
                    " the artifact store was changed after registration; not loading it"
                )
        return local

    def read_text(self, record: VersionRecord, filename: str) -> str:
        """A file registered beside a version's adapter (e.g. its job config)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{record.artifact_path}/{filename}"
            return Path(self.client.download_artifacts(record.run_id, path, tmp)).read_text()

    def read_optional(self, record: VersionRecord, filename: str) -> str | None:
        """`read_text`, or None when the version has no such file."""
        try:
            return self.read_text(record, filename)
        except (MlflowException, OSError):
            return None

    # -- model cards --------------------------------------------------------------------------

    def card(self, record: VersionRecord) -> str:
        """The version's model card as stored at registration (generated now, and said so, for
        a version older than stored cards), followed by what happened to it since."""
        stored = self.read_optional(record, MODEL_CARD_FILE)
        entries = self.history(record.name)
        registered = next(
            (
                e
                for e in reversed(entries)
                if e.action == "register" and e.version == record.version
            ),
            None,
        )
        logged = registered.details.get("card_sha256") if registered else None
        if stored is None:
            check = "generated now: the version predates stored model cards"
            stored = render_card(
                name=record.name,
                version=record.version,
                run_id=record.run_id,
                lineage=record.lineage,
                config_text=self.read_optional(record, CONFIG_FILE),
                registered_at=registered.time if registered else None,
                adapter_sha256=record.adapter_sha256,
            )
        elif logged is None:
            check = f"stored at registration ({MODEL_CARD_FILE}); no sha256 of it was logged"
        elif logged == sha256(stored):
            check = f"stored at registration ({MODEL_CARD_FILE}), matches the logged sha256"
        else:
            check = f"CHANGED since registration: its sha256 is not the logged {logged[:16]}..."
        try:
            aliases = sorted(a for a, v in self.aliases(record.name).items() if v == record.version)
            tags = self.client.get_model_version(record.name, record.version).tags
        except MlflowException:  # a record of a version no longer (or never) in this registry
            aliases, tags = [], {}
        mine = [e.line() for e in entries if record.version in (e.version, e.previous, e.new)]
        return stored + lifecycle(
            as_of=utc_now(), aliases=aliases, gate=tags.get(GATE_TAG), card_check=check, events=mine
        )

    def record_gate(self, name: str, versions: list[str], decision: str) -> None:
        """Keep the gate's decision on every version it judged (shown on their model cards)."""
        for version in versions:
            self.client.set_model_version_tag(name, version, GATE_TAG, f"{utc_now()} {decision}")

    # -- audit trail --------------------------------------------------------------------------

    def _audit(self, name: str) -> AuditLog:
        location = (self.artifact_root / "audit").as_uri() if self.artifact_root else None
        return AuditLog(self.client, name, location, self.trust)

    def _log_quietly(self, name: str, action: str, version: str, reason: str) -> None:
        try:
            self._audit(name).append(action, version, reason=reason)
        except Exception:  # noqa: BLE001 - already failing; the original error is raised
            log.exception("could not log %s of %s v%s", action, name, version)

    def history(self, name: str) -> list[AuditEntry]:
        """The model's audit log, oldest first (`verify` says whether it is intact)."""
        return self._audit(name).entries()

    def verify(self, name: str, anchor: str | None = None) -> LogCheck:
        """Check the model's audit log: the hash chain, its head, an earlier recorded head hash
        (`anchor`), and that `production` points where the log's last move left it."""
        audit = self._audit(name)
        check = audit.check(anchor)
        if check.entries == 0 and not check.problems:
            return LogCheck(0, None, [f"'{name}' has no audit log"])
        if not check.ok:
            return check
        moves = [e for e in audit.entries() if e.alias == PRODUCTION]
        try:
            current = self.aliases(name).get(PRODUCTION)
        except MlflowException:
            current = None
        logged = moves[-1].new if moves else None
        if current != logged:
            where = f"v{current}" if current else "nothing"
            said = f"v{logged} (entry #{moves[-1].seq})" if moves else "nowhere"
            return LogCheck(
                check.entries,
                check.head_sha256,
                [
                    f"production points at {where}, but the log's last production move is to "
                    f"{said}: moved outside fedforge (e.g. MLflow's UI), or a move did not finish"
                ],
            )
        return check

    # -- privacy budget -------------------------------------------------------------------------

    def privacy_budget(self, name: str) -> float | None:
        """The model's budget: the epsilon no data source of a production version may pass."""
        try:
            value = self.client.get_registered_model(name).tags.get(PRIVACY_BUDGET_TAG)
        except MlflowException:
            raise RegistryError(f"no model named '{name}'") from None
        return float(value) if value else None

    def set_privacy_budget(self, name: str, epsilon: float, reason: str | None = None) -> None:
        """Set or change the model's budget, logged in its audit trail first."""
        if not epsilon > 0:
            raise RegistryError(f"a privacy budget is an epsilon above 0, not {epsilon:g}")
        with self._alias_lock(name):
            self._write_budget(name, epsilon, reason)

    def _write_budget(self, name: str, epsilon: float, reason: str | None) -> None:
        previous = self.privacy_budget(name)
        details = {"epsilon": f"{epsilon:g}", "previous": f"{previous:g}" if previous else "-"}
        self._audit(name).append("budget", "-", reason=reason, details=details)
        self.client.set_registered_model_tag(name, PRIVACY_BUDGET_TAG, repr(float(epsilon)))

    def _adopt_budget(self, name: str, asked: float | None) -> None:
        current = self.privacy_budget(name)
        if asked is None or current == asked:
            return
        if current is None:
            self._write_budget(name, asked, "the first budget a job config set")
            return
        log.warning(
            "'%s' keeps its privacy budget epsilon %g (the job's config asked for %g): change it "
            "with `fedforge registry budget %s EPSILON --reason ...`",
            name,
            current,
            asked,
            name,
        )

    def check_budget(self, record: VersionRecord) -> None:
        """RegistryError naming the overrun if `record` is past its model's privacy budget."""
        label = f"v{record.version}"
        if why := budget_overrun(
            record.lineage.data_privacy, self.privacy_budget(record.name), label
        ):
            raise RegistryError(
                f"'{record.name}' {why}: it may not serve as {PRODUCTION} (a higher budget, if "
                f"intended: `fedforge registry budget {record.name} EPSILON --reason ...`)"
            )

    # -- aliases ------------------------------------------------------------------------------

    def _production(self, name: str) -> list[str]:
        """The production history, ending with the version the alias really points at (it may
        have been moved outside fedforge, e.g. in MLflow's UI)."""
        model = self.client.get_registered_model(name)
        history = [str(v) for v in json.loads(model.tags.get(PRODUCTION_HISTORY_TAG, "[]"))]
        current = model.aliases.get(PRODUCTION)
        if current is not None and (not history or history[-1] != str(current)):
            history.append(str(current))
        return history

    def _move_production(self, name: str, history: list[str]) -> None:
        # Only the latest moves: a tag holds at most 5,000 characters on a PostgreSQL or MySQL
        # store, which a whole history passes after about 730 moves (the audit log keeps all).
        kept = history[-PRODUCTION_HISTORY_KEPT:]
        self.client.set_registered_model_tag(name, PRODUCTION_HISTORY_TAG, json.dumps(kept))
        self.client.set_registered_model_alias(name, PRODUCTION, history[-1])

    def promote(self, name: str, ref: str | int, reason: str | None = None) -> VersionRecord:
        """Point `production` at a complete version (number or alias, e.g. `candidate`)."""
        with self._alias_lock(name):
            version = self.get(name, ref)
            self.check_budget(version)
            history = self._production(name)
            if not history or history[-1] != version.version:
                self._audit(name).append(
                    "promote",
                    version.version,
                    alias=PRODUCTION,
                    previous=self.aliases(name).get(PRODUCTION),
                    new=version.version,
                    reason=reason,
                    details={} if str(ref) == version.version else {"ref": str(ref)},
                )
                self._move_production(name, [*history, version.version])
        return version

    def rollback(self, name: str, reason: str | None = None) -> tuple[VersionRecord, list[str]]:
        """Move `production` back to the latest earlier version that still exists; returns it
        and the versions skipped on the way (deleted since they served)."""
        with self._alias_lock(name):
            history = self._production(name)
            skipped: list[str] = []
            for i in range(len(history) - 2, -1, -1):
                try:
                    target = self.get(name, history[i])
                except RegistryError:
                    skipped.append(history[i])
                    continue
                self.check_budget(target)  # refused, not skipped: the operator must choose
                self._audit(name).append(
                    "rollback",
                    target.version,
                    alias=PRODUCTION,
                    previous=self.aliases(name).get(PRODUCTION),
                    new=target.version,
                    reason=reason,
                    details={"skipped": ",".join(skipped)} if skipped else {},
                )
                self._move_production(name, history[: i + 1])
                return target, skipped
        gone = f" (v{', v'.join(skipped)} no longer exist)" if skipped else ""
        raise RegistryError(f"'{name}' has no earlier production version to roll back to{gone}")

    def delete(self, name: str, version: str | int, reason: str | None = None) -> list[str]:
        """Delete one version (its run's files stay); refused while `production` points at it.
        Returns the aliases that pointed at it (MLflow drops them with the version)."""
        number = str(version)
        if not number.isdigit():
            raise RegistryError(f"delete takes a version number, not an alias ('{version}')")
        with self._alias_lock(name):
            try:
                self.client.get_model_version(name, number)
            except MlflowException:
                raise RegistryError(f"no version '{number}' of model '{name}'") from None
            aliases = sorted(a for a, v in self.aliases(name).items() if v == number)
            if PRODUCTION in aliases:
                raise RegistryError(
                    f"v{number} of '{name}' is in production: promote another version or roll "
                    "back first"
                )
            self._audit(name).append(
                "delete",
                number,
                alias=",".join(aliases) or None,
                previous=number if aliases else None,
                reason=reason,
            )
            self.client.delete_model_version(name, number)
        return aliases

    @contextmanager
    def _alias_lock(self, name: str) -> Iterator[None]:
        """Serialise alias moves and audit-log appends of this store between processes on this
        host (the default SQLite store); an MLflow server has no lock to take: the last move
        wins, and the audit log orders appends itself (write-once slots)."""
        db = self.tracking_uri.removeprefix("sqlite:///")
        if db == self.tracking_uri:
            yield
            return
        with open(f"{db}.aliases.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _every_page(search, **kwargs) -> Iterator:
    """Every result of an MLflow search, page by page (one page holds 100 models by default)."""
    token = None
    while True:
        page = search(page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Readers run every few seconds (the endpoint's adapter table): say each problem once."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _already_exists(exc: MlflowException) -> bool:
    return exc.error_code == ErrorCode.Name(RESOURCE_ALREADY_EXISTS)


def _is_complete(version: ModelVersion) -> bool:
    """Registered to the end (versions from before the marker existed count as complete)."""
    return version.tags.get(REGISTRATION_TAG, COMPLETE) == COMPLETE


def check_model_name(name: str) -> None:
    """A registered model name that is a usable model id (`name` and `name:version` on the
    endpoint) and a safe path segment in caches."""
    if not MODEL_NAME.fullmatch(name):
        raise RegistryError(
            f"model name '{name}' is not allowed: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (':' separates versions, '/' paths)"
        )
