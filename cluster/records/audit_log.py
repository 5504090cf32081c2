"""The audit trail of a registered model: every register, promote, rollback and delete, in an
append-only log where each entry carries the sha256 of the one before (a hash chain).

Where it lives, and why there. The log is kept in the registry's own MLflow store, as the
parameters of one run per model (experiment `fedforge-audit`, the run tagged
`fedforge.audit_model=<name>`): one parameter per entry, its key the zero-padded sequence number,
its value the entry as canonical JSON. The sha256 of the last entry is also kept as a tag on the
registered model (`fedforge.audit_head`), so a log cut short at its end is noticed too.

- Every writer sees the same log: each job, CLI and replica that writes to a registry already
  reaches its store through one tracking URI, the default SQLite store under the state dir or an
  MLflow server shared by every node. A file beside the SQLite store would not be seen by nodes
  that reach the registry through a server, and a server offers clients no file system.
- Appends are safe under concurrency: MLflow refuses to change a parameter once logged (the
  store's unique key on run and key decides, in one transaction), so each slot is written once.
  Two writers racing for the next slot cannot both win; the loser reads the log again and chains
  after the winner. This holds on any SQL-backed store: SQLite here, the server's database there.
  Registered-model tags and artifacts, the other places MLflow offers, are overwritten silently
  by a second writer. On the local store the registry also holds its file lock while it appends,
  so writers on one host take turns and never retry.
- A process killed mid-append leaves the entry whole or absent (one row, one commit): there is
  no torn last line. A kill between the entry and the head tag leaves the head one entry behind,
  which `verify` accepts (the head says "at least this far").

What the chain shows, and what it cannot: an entry edited, deleted or moved breaks the chain at
that entry, and `verify` names the first bad one. Someone with write access to the store can
still rewrite every later entry and the head consistently: so entries are also signed and their
heads anchored outside the store (cluster/records/audit_trust.py), and a deleted audit run that
held entries is reported.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS, ErrorCode
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.records.audit_trust import AuditTrust
from cluster.records.lineage import AUDIT_HEAD_TAG, AUDIT_MODEL_TAG

log = logging.getLogger(__name__)

EXPERIMENT = "fedforge-audit"
ACTOR_ENV = "FEDFORGE_ACTOR"
GENESIS = "0" * 64  # what the first entry names as the hash before it
MAX_REASON = 1000  # characters: an entry must fit in one MLflow parameter (6000)
RETRIES = 20  # lost races for a slot before giving up (only under heavy contention)

Action = Literal["register", "promote", "rollback", "delete", "budget"]


class AuditLogError(RuntimeError):
    """The log could not be written (e.g. the store kept refusing the next slot)."""


def actor() -> str:
    """Who acts: $FEDFORGE_ACTOR, else the OS user at this host."""
    if os.environ.get(ACTOR_ENV):
        return os.environ[ACTOR_ENV]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class AuditEntry(BaseModel):
    """One recorded act. `alias`, `previous` and `new` describe the alias it moved (if any):
    the version the alias pointed at before and after."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int = Field(ge=0)
    time: str = Field(description="UTC, ISO 8601.")
    actor: str
    action: Action
    model: str
    version: str = Field(description="The version acted on.")
    alias: str | None = None
    previous: str | None = None
    new: str | None = None
    reason: str = ""
    details: dict[str, str] = Field(default_factory=dict)
    prev_sha256: str = Field(description="sha256 of the entry before (zeros for the first).")
    signature: str = Field(
        "", description="Ed25519 over `signed_text` (cluster.records.audit_trust); '' unsigned."
    )

    @property
    def signed_text(self) -> str:
        """What the signature covers: the canonical form without the signature."""
        return json.dumps(
            self.model_dump(exclude={"signature"}), sort_keys=True, separators=(",", ":")
        )

    @property
    def text(self) -> str:
        """The canonical form: what is stored and hashed (an unsigned entry has no signature
        key, as entries were written before signing)."""
        fields = self.model_dump(exclude=set() if self.signature else {"signature"})
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        return sha256(self.text)

    def line(self) -> str:
        move = ""
        if self.alias:
            move = f" {self.alias}: {_v(self.previous)} -> {_v(self.new)}"
        why = f"  reason: {self.reason}" if self.reason else ""
        if self.action == "budget":  # a model's privacy budget: no version acted on
            before, after = self.details.get("previous", "-"), self.details.get("epsilon", "-")
            return (
                f"#{self.seq:<4} {self.time}  {self.actor}  budget epsilon {before} -> {after}{why}"
            )
        return f"#{self.seq:<4} {self.time}  {self.actor}  {self.action} v{self.version}{move}{why}"


def holder_at(entries: list[AuditEntry], alias: str, when: datetime) -> AuditEntry | None:
    """The entry that last moved `alias` at or before `when`: its `new` is the version the
    alias pointed at then (None: no logged move of the alias yet)."""
    last = None
    for entry in entries:
        if entry.alias == alias and entry.action != "delete":
            if datetime.fromisoformat(entry.time) > when:
                break
            last = entry
    return last


def _v(version: str | None) -> str:
    return f"v{version}" if version else "-"


@dataclass(frozen=True)
class LogCheck:
    """What `verify` found: the entries read, the head hash, and problems (first bad first)."""

    entries: int
    head_sha256: str | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_chain(
    slots: dict[str, str],
    head: str | None,
    anchor: str | None = None,
    trust: AuditTrust | None = None,
    anchored: tuple[int, str] | None = None,
) -> LogCheck:
    """Verify a log's slots (key -> stored text) against its head tag ("<seq> <sha256>") and,
    if given, a head hash recorded earlier (`anchor`); with `trust`, every entry's signature and
    the last head the deployment's anchor recorded for the model (`anchored`: the log must end
    exactly there). A log begun before signing keeps an unsigned prefix: the first signed entry
    covers it through its chain link. Pure: tests tamper with its input."""
    problems: list[str] = []
    previous, hashes = GENESIS, []
    signing = False  # entries before the first signed one were written before signing began
    numbered = sorted((int(key), key, text) for key, text in slots.items() if key.isdigit())
    odd = sorted(key for key in slots if not key.isdigit())
    if odd:
        problems.append(f"the log holds entries that are not numbered: {', '.join(odd)}")
    for expected, (seq, _key, text) in enumerate(numbered):
        if seq != expected:
            gap = f"#{expected}" if seq == expected + 1 else f"#{expected} to #{seq - 1}"
            jump = f"jumps from #{expected - 1} to #{seq}" if expected else f"starts at #{seq}"
            problems.append(f"entry {gap} is missing: the log {jump}")
            break
        try:
            entry = AuditEntry.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            problems.append(f"entry #{seq} was edited: it is not a valid entry ({first['msg']})")
            break
        if entry.seq != seq:
            problems.append(
                f"entry #{seq} holds entry #{entry.seq} ({entry.action} v{entry.version}): "
                "the log was reordered"
            )
            break
        if entry.text != text:
            problems.append(f"entry #{seq} was edited: it is not in the form fedforge wrote")
            break
        signing = signing or bool(entry.signature)
        if trust and signing and not trust.verifies(entry.signed_text, entry.signature):
            problems.append(
                f"entry #{seq} ({entry.action} v{entry.version}) is not signed by this "
                "deployment's audit key: it was written or rewritten outside fedforge"
            )
            break
        if entry.prev_sha256 != previous:
            named = f"entry #{seq - 1}" if seq else "the log's start"
            problems.append(
                f"{named} was edited or replaced: entry #{seq} ({entry.action} v{entry.version} "
                f"at {entry.time}) recorded its sha256 as {entry.prev_sha256[:16]}..., it is now "
                f"{previous[:16]}..."
            )
            break
        previous = sha256(text)
        hashes.append(previous)
    if not problems and head:
        head_seq, _, head_sha = head.partition(" ")
        if not head_seq.isdigit():
            problems.append(f"the log's head tag is not '<seq> <sha256>': {head!r}")
        elif int(head_seq) >= len(hashes):
            last = f"#{len(hashes) - 1}" if hashes else "no entry"
            problems.append(
                f"entry #{len(hashes)} is missing: the log head records #{head_seq}, "
                f"the log ends at {last}"
            )
        elif hashes[int(head_seq)] != head_sha:
            problems.append(
                f"entry #{head_seq} was edited: its sha256 is not the one the log head recorded "
                f"({head_sha[:16]}...)"
            )
    if not problems and trust is not None and (signing or anchored):
        problems += _anchor_problems(hashes, anchored)
    if not problems and anchor and anchor not in hashes:
        problems.append(
            f"no entry has the recorded head sha256 {anchor[:16]}...: the log was rewritten"
        )
    return LogCheck(len(numbered), hashes[-1] if hashes else None, problems)


def _anchor_problems(hashes: list[str], anchored: tuple[int, str] | None) -> list[str]:
    """The last head the anchor outside the store recorded must be in the log, as it was. The
    log may go past it only with signed entries (a writer killed before anchoring), which were
    checked before."""
    if anchored is None:
        return ["the anchor holds no head for this model: signed entries it never saw"]
    seq, sha = anchored
    if seq >= len(hashes):
        return [f"the log ends at #{len(hashes) - 1} but the anchor recorded #{seq}: entries "
                "were removed"]  # fmt: skip
    if hashes[seq] != sha:
        return [f"entry #{seq} is not the one the anchor recorded ({sha[:16]}...): the log was "
                "rewritten"]  # fmt: skip
    return []


class AuditLog:
    """The audit log of one registered model in an MLflow store (see the module docstring);
    signed and anchored outside the store when given the deployment's `trust`."""

    def __init__(
        self,
        client: MlflowClient,
        model: str,
        artifact_location: str | None = None,
        trust: AuditTrust | None = None,
    ):
        self.client = client
        self.model = model
        self.artifact_location = artifact_location
        self.trust = trust

    # -- where it lives -------------------------------------------------------------------------

    def _experiment_id(self, create: bool) -> str | None:
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment or not create:
            return experiment.experiment_id if experiment else None
        try:
            return self.client.create_experiment(
                EXPERIMENT, artifact_location=self.artifact_location
            )
        except MlflowException as exc:  # a concurrent writer created it first
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        return self.client.get_experiment_by_name(EXPERIMENT).experiment_id

    def _runs(self, experiment_id: str, view: int = ViewType.ACTIVE_ONLY) -> list[str]:
        """The model's log runs, the one in use first (earliest created; run id breaks ties)."""
        name = self.model.replace("\\", "\\\\").replace("'", "\\'")
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{AUDIT_MODEL_TAG}` = '{name}'",
            run_view_type=view,
            max_results=50,
        )
        ordered = sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))
        return [r.info.run_id for r in ordered]

    def run_id(self, create: bool = False) -> str | None:
        experiment_id = self._experiment_id(create)
        if experiment_id is None:
            return None
        runs = self._runs(experiment_id)
        if runs or not create:
            return runs[0] if runs else None
        mine = self.client.create_run(
            experiment_id, run_name=f"audit-{self.model}", tags={AUDIT_MODEL_TAG: self.model}
        ).info.run_id
        self.client.set_terminated(mine, "FINISHED")  # a record, not a job: never shown running
        # Another writer may have made one at the same moment: both use the earliest and the
        # other is dropped. (Only writers on hosts whose clocks disagree, racing for a model's
        # first entry, could still split the log; `check` reports it.)
        chosen = self._runs(experiment_id)[0]
        if chosen != mine:
            self.client.delete_run(mine)
        return chosen

    # -- reading --------------------------------------------------------------------------------

    def slots(self) -> dict[str, str]:
        run_id = self.run_id()
        return dict(self.client.get_run(run_id).data.params) if run_id else {}

    def head(self) -> str | None:
        try:
            return self.client.get_registered_model(self.model).tags.get(AUDIT_HEAD_TAG)
        except MlflowException:  # the model itself is gone: its log stays
            return None

    def entries(self) -> list[AuditEntry]:
        """The entries in order, as far as they parse (`check` says whether they are intact)."""
        entries = []
        for _, text in sorted(self.slots().items(), key=lambda kv: _order(kv[0])):
            try:
                entries.append(AuditEntry.model_validate_json(text))
            except ValidationError:
                continue
        return entries

    def check(self, anchor: str | None = None) -> LogCheck:
        anchored = self.trust.anchor.latest(self.model) if self.trust else None
        check = check_chain(self.slots(), self.head(), anchor, self.trust, anchored)
        experiment_id = self._experiment_id(create=False)
        runs = self._runs(experiment_id) if experiment_id else []
        problems = list(check.problems)
        if len(runs) > 1:  # only if first writes on two hosts raced (see run_id)
            problems.append(
                f"the log is split over {len(runs)} runs ({', '.join(runs)}); {runs[0]} is used"
            )
        deleted = self._runs(experiment_id, ViewType.DELETED_ONLY) if experiment_id else []
        # A run that lost a first-write race is deleted empty (run_id); one holding entries was
        # deleted by someone else, to replace the log.
        if emptied := [r for r in deleted if self.client.get_run(r).data.params]:
            problems.append(f"an audit run of this model was deleted ({', '.join(emptied)})")
        return LogCheck(check.entries, check.head_sha256, problems)

    # -- writing --------------------------------------------------------------------------------

    def append(
        self,
        action: Action,
        version: str,
        *,
        alias: str | None = None,
        previous: str | None = None,
        new: str | None = None,
        reason: str | None = None,
        details: dict[str, str] | None = None,
    ) -> AuditEntry:
        """Write the next entry, chained to the last one; retried when another writer took the
        slot first."""
        run_id = self.run_id(create=True)
        for _ in range(RETRIES):
            slots = self.client.get_run(run_id).data.params
            numbered = {int(k): text for k, text in slots.items() if k.isdigit()}
            seq = max(numbered) + 1 if numbered else 0
            entry = AuditEntry(
                seq=seq,
                time=utc_now(),
                actor=actor(),
                action=action,
                model=self.model,
                version=str(version),
                alias=alias,
                previous=None if previous is None else str(previous),
                new=None if new is None else str(new),
                reason=(reason or "")[:MAX_REASON],
                details=details or {},
                prev_sha256=sha256(numbered[seq - 1]) if seq else GENESIS,
            )
            if self.trust is not None:
                entry = entry.model_copy(update={"signature": self.trust.sign(entry.signed_text)})
            try:
                self.client.log_param(run_id, _key(seq), entry.text)
            except MlflowException as exc:
                if exc.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE) and _key(seq) in (
                    self.client.get_run(run_id).data.params
                ):
                    continue  # another writer took this slot: chain after it
                raise
            if self.trust is not None:  # a crash before this leaves a signed entry unanchored
                self.trust.anchor.record(self.model, seq, entry.sha256)
            try:
                self.client.set_registered_model_tag(
                    self.model, AUDIT_HEAD_TAG, f"{seq} {entry.sha256}"
                )
            except MlflowException as exc:  # a head left behind is allowed: it means "at least"
                log.warning("audit log of '%s': head not updated (%s)", self.model, exc)
            return entry
        raise AuditLogError(f"could not append to the audit log of '{self.model}': busy")


def _key(seq: int) -> str:
    return f"{seq:08d}"


def _order(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (-1, key)
