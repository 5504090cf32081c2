"""The release manifest: everything a registered version and its run release, and how each item
is covered by the privacy guarantee.

A federated run under DP promises that everything it releases that depends on clients' data is
(epsilon, delta)-DP. That promise holds only for what is listed here, so the list is checked:
registration refuses a file or tag it does not name (`check_registration`), and
`fedforge privacy certificate` and the tests enumerate a version's whole release (artifacts,
tags, params, metrics, the run's round log, the job's log lines) against it
(`unlisted`). Coverage, one of:

- `dp`: inside the DP release and accounted (the adapter, and what is computed from it alone).
- `not_private`: computed only from data that is not the clients' (the config, the base model,
  the environment, the server's held-out split, the central share, tensor shapes).
- `declared_public`: each client's example count, and the accounting made from it (sampling
  rates, epsilon). The guarantee treats them as public, as Opacus' accountant does: they set a
  client's sampling rate and aggregation weight.
- `keyed`: an HMAC under the deployment's example key (cluster.core.example_ids), which never leaves
  the state dir: without it, indistinguishable from random.
- `without_dp_only`: written only by runs without DP (losses, timings); a version trained under
  DP that carries one breaks its guarantee.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from cluster.core.errors import UserError

if TYPE_CHECKING:  # the registry's own module imports this one
    from cluster.records.registry import Registry, VersionRecord

Coverage = Literal["dp", "not_private", "declared_public", "keyed", "without_dp_only"]
Place = Literal[
    "artifact", "version_tag", "model_tag", "run_param", "run_metric", "run_tag", "round_field",
    "log_line",
]  # fmt: skip


@dataclass(frozen=True)
class Entry:
    place: Place
    pattern: str  # fnmatch pattern; for log lines, a regular expression matched from the start
    coverage: Coverage
    why: str


def _entries(place: Place, coverage: Coverage, why: str, *patterns: str) -> list[Entry]:
    return [Entry(place, p, coverage, why) for p in patterns]


MANIFEST: tuple[Entry, ...] = tuple(
    [
        # -- the registered version's files ------------------------------------------------
        *_entries("artifact", "dp", "the adapter: DP-SGD's output", "adapter_model.safetensors"),
        *_entries(
            "artifact",
            "not_private",
            "LoRA shape, base model name, peft's template",
            "adapter_config.json",
            "README.md",
        ),  # fmt: skip
        *_entries(
            "artifact",
            "declared_public",
            "the accounting: noise, rates from example counts, epsilon per client and round",
            "privacy.json",
        ),  # fmt: skip
        *_entries(
            "artifact",
            "not_private",
            "the job config (credentials removed)",
            "fedforge_config.yaml",
        ),  # fmt: skip
        *_entries(
            "artifact",
            "not_private",
            "lineage, metrics on the server's held-out split, accounting",
            "MODEL_CARD.md",
        ),  # fmt: skip
        *_entries(
            "artifact",
            "not_private",
            "features of examples that no DP release in the ancestry protects (the central share)",
            "training_profile.json",
        ),  # fmt: skip
        *_entries(
            "artifact", "keyed", "which examples each run in the ancestry used", "data_uses.json"
        ),  # fmt: skip
        # -- the version's tags ------------------------------------------------------------
        *_entries(
            "version_tag",
            "not_private",
            "what, from where, by which code",
            "fedforge.kind",
            "fedforge.base_model",
            "fedforge.run_name",
            "fedforge.lora_rank",
            "fedforge.config_sha256",
            "fedforge.git_revision",
            "fedforge.packages",
            "fedforge.python",
            "fedforge.platform",
            "fedforge.artifact_path",
            "fedforge.registration",
            "fedforge.gate",
        ),  # fmt: skip
        *_entries(
            "version_tag",
            "not_private",
            "size of the server's held-out split",
            "fedforge.validation_examples",
        ),  # fmt: skip
        *_entries("version_tag", "keyed", "the data file's HMAC", "fedforge.dataset_digest"),
        *_entries(
            "version_tag",
            "dp",
            "sha256 of the adapter's files (post-processing)",
            "fedforge.adapter_sha256",
        ),  # fmt: skip
        *_entries(
            "version_tag",
            "declared_public",
            "the accounting",
            "fedforge.privacy.*",
            "fedforge.data_privacy",
        ),  # fmt: skip
        *_entries(
            "version_tag",
            "not_private",
            "metrics on the server's held-out split and tensor sizes",
            "fedforge.metric.eval_*",
            "fedforge.metric.base_accuracy",
            "fedforge.metric.communication_mb",
        ),  # fmt: skip
        *_entries(
            "version_tag",
            "without_dp_only",
            "training loss",
            "fedforge.metric.loss",
            "fedforge.metric.train_loss",
        ),  # fmt: skip
        # -- the registered model's tags -------------------------------------------------------
        *_entries(
            "model_tag",
            "not_private",
            "alias history, audit log head, privacy budget",
            "fedforge.production_history",
            "fedforge.audit_head",
            "fedforge.privacy_budget",
        ),  # fmt: skip
        # -- the MLflow run ----------------------------------------------------------------
        *_entries("run_param", "not_private", "the job config", "config.*"),
        *_entries(
            "run_tag", "not_private", "MLflow's own: run name, user, source", "mlflow.*"
        ),  # fmt: skip
        *_entries(
            "run_metric",
            "not_private",
            "on the server's held-out split; tensor sizes",
            "eval_*",
            "base_accuracy",
            "communication_mb",
        ),  # fmt: skip
        *_entries("run_metric", "declared_public", "epsilon after each round", "epsilon"),
        *_entries("run_metric", "without_dp_only", "training loss", "loss", "train_loss"),
        # -- the run's round log (rounds.jsonl) --------------------------------------------
        *_entries(
            "round_field",
            "not_private",
            "what the server did and saw",
            "round",
            "attempt",
            "clients",
            "failed",
            "rejected",
            "bytes_sent",
            "bytes_received",
            "per_client.*.partition",
        ),  # fmt: skip
        *_entries(
            "round_field",
            "declared_public",
            "example counts and the accounting",
            "epsilon",
            "epsilons",
            "per_client.*.num_examples",
            "per_client.*.steps",
            "per_client.*.epsilon",
        ),  # fmt: skip
        *_entries(
            "round_field",
            "without_dp_only",
            "losses and timings (a client's compute time follows the examples it sampled)",
            "train_loss",
            "seconds",
            "slowest_client_seconds",
            "per_client.*.train_loss",
            "per_client.*.train_seconds",
        ),  # fmt: skip
        # -- the job's own log lines -------------------------------------------------------
        *_entries(
            "log_line",
            "declared_public",
            "partition sizes and the noise plan",
            r"\[fedforge\] plan: ",
        ),  # fmt: skip
        *_entries(
            "log_line",
            "not_private",
            "progress without data",
            r"\[fedforge\] (started a local Ray head|connected to Ray|outside SuperNodes "
            r"join at|evaluating base model|registered )",
        ),  # fmt: skip
        *_entries(
            "log_line",
            "declared_public",
            "a round: clients kept, epsilon, MB moved (loss and seconds only without DP)",
            r"\[fedforge\] round \d+: ",
        ),  # fmt: skip
        *_entries(
            "log_line",
            "not_private",
            "who was left out and the server's reason",
            r"\[fedforge\]   node \d+ left out: ",
        ),  # fmt: skip
    ]
)


def covering(place: Place, name: str) -> Entry | None:
    for entry in MANIFEST:
        if entry.place != place:
            continue
        if place == "log_line":
            if re.match(entry.pattern, name):
                return entry
        elif fnmatch.fnmatchcase(name, entry.pattern):
            return entry
    return None


def unlisted(place: Place, names: Iterable[str], private: bool) -> list[str]:
    """Items at `place` the manifest does not cover, or (for a run under DP, `private`) covers
    only for runs without DP: each one a release the guarantee does not hold for."""
    problems = []
    for name in names:
        entry = covering(place, name)
        if entry is None:
            problems.append(f"{place} '{name}' is not in the release manifest")
        elif private and entry.coverage == "without_dp_only":
            problems.append(f"{place} '{name}' is released by a run under DP ({entry.why})")
    return problems


def round_fields(line: dict) -> list[str]:
    """A rounds.jsonl line's released fields, `per_client.<node>.<field>` for its clients."""
    names = [k for k, v in line.items() if v is not None and k != "per_client"]
    for metrics in (line.get("per_client") or {}).values():
        names += [f"per_client.*.{k}" for k, v in metrics.items() if v is not None]
    return sorted(set(names))


def job_log_lines(text: str) -> list[str]:
    """The job's own lines: fedforge's (other processes' logs carry no data of the run)."""
    return [line[line.index("[fedforge]") :] for line in text.splitlines() if "[fedforge]" in line]


def manifest_sha256() -> str:
    """Names the manifest a certificate was checked against."""
    text = json.dumps([asdict(e) for e in MANIFEST], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def registered_release(registry: Registry, record: VersionRecord) -> dict[Place, list[str]]:
    """What the registry holds for a version, as anyone with read access sees it: its files,
    its tags and its model's, its run's params, metrics and tags."""
    client = registry.client
    files, folders = [], [record.artifact_path]
    while folders:
        for item in client.list_artifacts(record.run_id, folders.pop()):
            (folders if item.is_dir else files).append(item.path)
    run = client.get_run(record.run_id).data
    version = client.get_model_version(record.name, record.version)
    model = client.get_registered_model(record.name)
    return {
        "artifact": [f.removeprefix(record.artifact_path + "/") for f in files],
        "version_tag": list(version.tags),
        "model_tag": list(model.tags),
        "run_param": list(run.params),
        "run_metric": list(run.metrics),
        "run_tag": list(run.tags),
    }


def check_registered(registry: Registry, record: VersionRecord) -> list[str]:
    """Every item of a version's registered release that the manifest does not cover for it."""
    private = record.lineage.privacy is not None and record.lineage.privacy.mode != "none"
    return [
        problem
        for place, names in registered_release(registry, record).items()
        for problem in unlisted(place, names, private)
    ]


class UnlistedRelease(UserError):
    """A registration would release something the manifest does not cover."""


def check_registration(files: Iterable[str], tags: Iterable[str], private: bool) -> None:
    """Refuse, before anything is uploaded, a version whose files or tags the manifest does not
    cover (a new feature must say how what it writes is covered before it can release it)."""
    problems = [*unlisted("artifact", files, private), *unlisted("version_tag", tags, private)]
    if problems:
        raise UnlistedRelease(
            "refusing to register: "
            + "; ".join(problems)
            + " (cluster/records/release_manifest.py)"
        )
