"""Federated DP fine-tuning of a LoRA adapter: Flower rounds on Ray, then evaluation and registry.

    ray job submit --working-dir . -- python -m federated.run \
        --config configs/federated/demo.yaml --state-dir "$PWD/.fedforge"

Every round's global adapter is saved; submitting the same `name` again resumes after the last
saved round. The final adapter is registered with its privacy budget in the lineage, alias
`candidate`.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from cluster.core.config import load_config
from cluster.core.entry import run_job
from cluster.core.example_ids import ExampleKey
from cluster.core.federated_config import FederatedConfig
from cluster.core.ray_cluster import connect
from cluster.core.state import StateDir
from cluster.records.lineage import COMMUNICATION_METRIC, DATA_USES_FILE
from cluster.records.privacy_record import DataUse, DataUses, PrivacyRecord
from cluster.records.registry import Registry
from federated.federation import Federation
from federated.plan import FederatedPlan
from federated.planning import make_plan
from federated.privacy.accounting import privacy_record
from federated.privacy.ancestry import ancestor_uses, compose, run_use
from federated.privacy.ledger import ServerLedger
from federated.protocol import EPSILON, TRAIN_LOSS
from federated.run_config import RunSpec
from federated.run_files import RunFiles
from federated.strategy import RoundReport
from llm.data import dataset_sha256
from llm.publish import Published, example_ids, own_source, publish_adapter, tracked_run
from llm.run_identity import check_or_record

# What may change when a run is submitted again: how many rounds, how it is served and judged,
# and where round 0 came from (read only when no round is saved yet).
RESUMABLE_KEYS = {"federation.rounds", "federation.initial_adapter"}
RESUMABLE_SECTIONS = ("eval.", "registry.", "flower.", "card.")


@dataclass(frozen=True)
class FederatedOutcome:
    published: Published
    privacy: PrivacyRecord


def _plan_line(plan: FederatedPlan) -> str:
    sizes = "/".join(str(len(p)) for p in plan.partitions)
    line = f"[fedforge] plan: {len(plan.partitions)} in-cluster clients with {sizes} examples"
    if plan.noise:
        noise = plan.noise
        line += (
            f"; noise multiplier {noise.noise_multiplier:.4g} over {noise.steps} accounted "
            f"steps, sampling rate up to {noise.sample_rate:.4g}"
        )
        if noise.spent_rounds:
            line += f" (for the rounds after the {noise.spent_rounds} already run)"
    return line


def _round_line(report: RoundReport) -> str:
    eps = f"{report.epsilon:.3f}" if report.epsilon is not None else "-"
    loss = f"{report.train_loss:.4f}" if report.train_loss is not None else "-"
    slowest = report.slowest_client_seconds
    line = (
        f"[fedforge] round {report.round}: {report.clients} clients, loss {loss}, "
        f"epsilon {eps}, {report.bytes_moved / 1e6:.2f} MB moved"
        + (f", {report.seconds:.1f} s" if report.seconds is not None else "")
        + (f" (slowest client {slowest:.1f} s)" if slowest else "")
    )
    for node, why in {**report.failed, **report.rejected}.items():
        line += f"\n[fedforge]   node {node} left out: {why}"
    return line


def _pin_initial_adapter(cfg: FederatedConfig, state: StateDir, files: RunFiles) -> FederatedConfig:
    """`federation.initial_adapter` as the version it named when the run first started (an
    alias may move later): the rounds start from it and the lineage composes its privacy."""
    ref = cfg.federation.initial_adapter
    if not ref:
        return cfg
    pinned = files.root / "initial_adapter"
    if not pinned.is_file():
        name, _, alias = ref.rpartition(":")
        version = Registry.from_settings(cfg.registry, state).get(name, alias).version
        pinned.write_text(f"{name}:{version}")
    federation = cfg.federation.model_copy(update={"initial_adapter": pinned.read_text()})
    return cfg.model_copy(update={"federation": federation})


def _ancestry_uses(cfg: FederatedConfig, registry: Registry) -> list[DataUse]:
    """Every data use of the starting adapter's ancestry (none for a fresh adapter)."""
    if not cfg.federation.initial_adapter:
        return []
    ref = cfg.federation.initial_adapter
    name, _, version = ref.rpartition(":")
    record = registry.get(name, version)
    uses = registry.read_optional(record, DATA_USES_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        own = PrivacyRecord.read(registry.download(name, version, Path(tmp)))
    return ancestor_uses(
        ref, record.lineage, own, DataUses.model_validate_json(uses) if uses else None
    )


def run_federated(
    cfg: FederatedConfig, state: StateDir, address: str | None = None
) -> FederatedOutcome:
    model_path = state.base_model(cfg.model.base)
    files = RunFiles(state, cfg.name)
    check_or_record(
        cfg, files.root, RESUMABLE_KEYS, RESUMABLE_SECTIONS, data=dataset_sha256(cfg.data.path)
    )
    cfg = _pin_initial_adapter(cfg, state, files)
    ledger = ServerLedger(files.root)
    # A missing dataset, an impossible split or DP target fails here; a resumed run is planned
    # against what its ledger already charged.
    plan = make_plan(cfg, ledger, files.latest_round() or 0)
    print(_plan_line(plan), flush=True)
    connect(address)
    rounds = cfg.federation.rounds
    if (files.latest_round() or 0) < rounds:
        with tqdm(total=rounds, initial=files.latest_round() or 0, desc="rounds") as bar:

            def on_round(report: RoundReport) -> None:
                tqdm.write(_round_line(report))
                bar.update(1)

            with Federation(RunSpec(cfg, plan, state), files) as federation:
                print(f"[fedforge] outside SuperNodes join at {federation.address}", flush=True)
                federation.run(on_round)
    files.check_complete(rounds)  # never publish a round whose line or adapter is missing
    adapter_dir = files.adapter_dir(rounds)
    history = [r for r in files.rounds() if r.round <= rounds]
    registry = Registry.from_settings(cfg.registry, state)
    privacy = privacy_record(cfg, plan, history, ledger)
    privacy.write(adapter_dir)  # the guarantee travels with the adapter
    key = ExampleKey.of(state)
    uses = [
        run_use(privacy, own_source(cfg, key), key.key_id, example_ids(cfg, key)),
        *_ancestry_uses(cfg, registry),
    ]
    with tracked_run(registry, cfg) as run_id:
        for report in history:
            per_round = {
                TRAIN_LOSS: report.train_loss,
                EPSILON: report.epsilon,
                COMMUNICATION_METRIC: report.bytes_moved / 1e6,
            }
            registry.log_metrics(
                run_id, {k: v for k, v in per_round.items() if v is not None}, report.round
            )
        moved = sum(report.bytes_moved for report in history)
        published = publish_adapter(
            registry,
            run_id,
            cfg,
            model_path,
            adapter_dir,
            kind="federated",
            key=key,
            metrics={COMMUNICATION_METRIC: moved / 1e6},
            privacy=privacy.budget,
            uses=uses,
            data_privacy=compose(uses, key.key_id, cfg.privacy.delta),
            privacy_budget=cfg.privacy.budget_epsilon,
        )
    return FederatedOutcome(published, privacy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Federated LoRA rounds (Flower) on Ray")
    parser.add_argument("--config", required=True, help="YAML, e.g. configs/federated/demo.yaml")
    parser.add_argument("--state-dir", default=None, help="state directory (absolute in Ray jobs)")
    parser.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[fedforge] %(message)s")
    cfg = load_config(args.config, FederatedConfig)
    outcome = run_federated(cfg, StateDir.resolve(args.state_dir), args.address)
    published, privacy = outcome.published, outcome.privacy
    eps = f"{privacy.epsilon:.3f}" if privacy.epsilon is not None else "n/a (no DP)"
    print(
        f"[fedforge] registered {cfg.registry.model_name} v{published.version.version} (alias "
        f"candidate): held-out accuracy base {published.base.accuracy:.1%} -> federated "
        f"{published.tuned.accuracy:.1%}; privacy epsilon {eps} at delta {cfg.privacy.delta:g}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    run_job(main)
