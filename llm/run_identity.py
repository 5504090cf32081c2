"""Guard for resuming: a run name may only be resumed with a config that trains the same thing.

Ray Train resumes any run whose name already has checkpoints. If the model, data, LoRA shape or
batch changed, the old optimizer and adapter state do not fit the new run (or silently mean
something else), so the job refuses with the keys that changed instead of failing in a worker.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path

from pydantic import BaseModel

from cluster.core.errors import UserError

IDENTITY_FILE = "fedforge_run_identity.json"
# Keys that may change between submissions of one run: how long, how often, how it is judged.
MUTABLE = {
    "train.max_steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.report_every",
    "scaling.max_failures",
    "scaling.num_workers",
    "scaling.cpus_per_worker",
    "scaling.use_gpu",
}
MUTABLE_SECTIONS = ("eval.", "registry.", "card.")  # what is reported, not trained
DATA_CONTENT = "data.content_sha256"  # beside the config's keys: the data itself


class RunMismatchError(UserError):
    """The run's checkpoints were made with an incompatible config. The message is for users."""


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def identity(
    cfg: BaseModel, mutable: Collection[str] = MUTABLE, sections: tuple[str, ...] = MUTABLE_SECTIONS
) -> dict[str, object]:
    return {
        key: value
        for key, value in flatten(cfg.model_dump(mode="json")).items()
        if key not in mutable and not key.startswith(sections)
    }


def check_or_record(
    cfg: BaseModel,
    run_dir: Path,
    mutable: Collection[str] = MUTABLE,
    sections: tuple[str, ...] = MUTABLE_SECTIONS,
    *,
    data: str,
) -> None:
    """Record the run's identity on first start; on a resume, refuse an incompatible config or
    data whose content changed (`data`: its digest).

    `mutable` keys and keys under `sections` may change between submissions (the defaults are
    the fine-tuning job's). The data's content is part of the identity: the steps already taken
    were planned, and their privacy accounted, for the examples as they were.
    """
    path = run_dir / IDENTITY_FILE
    current = {**identity(cfg, mutable, sections), DATA_CONTENT: data}
    if path.is_file():
        recorded = json.loads(path.read_text())
        changed = sorted(
            k for k in recorded.keys() | current.keys() if recorded.get(k) != current.get(k)
        )
        if DATA_CONTENT in changed:
            was = recorded.get(DATA_CONTENT)
            raise RunMismatchError(
                f"run '{cfg.name}' already trained on the data at data.path, and that data has "
                f"changed since (sha256 {f'{was[:16]}...' if was else 'not recorded'} then, "
                f"{data[:16]}... now): the steps already taken were planned and accounted for "
                "the examples as they were. Restore the data, or start a new run (a new `name`)."
            )
        if changed:
            raise RunMismatchError(
                f"run '{cfg.name}' already has checkpoints in {run_dir} made with a different "
                f"config ({', '.join(changed)} changed). Use a new `name`, or delete that "
                "directory to start over."
            )
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(current, indent=2, sort_keys=True))
    os.replace(staging, path)
