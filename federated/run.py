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
from dataclasses import dataclass

from tqdm import tqdm

from cluster.entry import run_job
from cluster.privacy_record import PrivacyRecord
from cluster.ray_cluster import connect
from cluster.registry import Registry
from cluster.state import StateDir
from federated.config import FederatedConfig, load_federated_config
from federated.federation import Federation
from federated.partition import client_partitions
from federated.privacy import privacy_record
from federated.run_files import RunFiles
from llm.publish import Published, publish_adapter, tracked_run
from llm.run_identity import check_or_record

# What may change when a run is submitted again: how many rounds, how it is served and judged,
# and where round 0 came from (read only when no round is saved yet).
RESUMABLE_KEYS = {"federation.rounds", "federation.initial_adapter"}
RESUMABLE_SECTIONS = ("eval.", "registry.", "flower.")


@dataclass(frozen=True)
class FederatedOutcome:
    published: Published
    privacy: PrivacyRecord


def _round_line(entry: dict) -> str:
    eps = f"{entry['epsilon']:.3f}" if entry.get("epsilon") is not None else "-"
    loss = f"{entry['train_loss']:.4f}" if entry.get("train_loss") is not None else "-"
    slowest = entry.get("slowest_client_seconds")
    line = (
        f"[fedforge] round {entry['round']}: {entry['clients']} clients, loss {loss}, "
        f"epsilon {eps}, {entry['seconds']:.1f} s"
        + (f" (slowest client {slowest:.1f} s)" if slowest else "")
    )
    for node, why in {**entry["failed"], **entry["rejected"]}.items():
        line += f"\n[fedforge]   node {node} left out: {why}"
    return line


def run_federated(
    cfg: FederatedConfig, state: StateDir, address: str | None = None
) -> FederatedOutcome:
    model_path = state.base_model(cfg.model.base)
    client_partitions(cfg)  # a missing dataset or an impossible split fails before Ray starts
    files = RunFiles(state, cfg.name)
    check_or_record(cfg, files.root, RESUMABLE_KEYS, RESUMABLE_SECTIONS)
    connect(address)
    rounds = cfg.federation.rounds
    if (files.latest_round() or 0) < rounds:
        with tqdm(total=rounds, initial=files.latest_round() or 0, desc="rounds") as bar:

            def on_round(entry: dict) -> None:
                tqdm.write(_round_line(entry))
                bar.update(1)

            with Federation(cfg, state, files) as federation:
                print(f"[fedforge] outside SuperNodes join at {federation.address}", flush=True)
                federation.run(on_round)
    adapter_dir = files.adapter_dir(rounds)
    history = files.rounds()
    privacy = privacy_record(cfg, history)
    privacy.write(adapter_dir)  # the guarantee travels with the adapter
    registry = Registry.from_settings(cfg.registry, state)
    with tracked_run(registry, cfg) as run_id:
        for entry in history:
            per_round = {"train_loss": entry["train_loss"], "epsilon": entry["epsilon"]}
            registry.log_metrics(
                run_id, {k: v for k, v in per_round.items() if v is not None}, entry["round"]
            )
        published = publish_adapter(
            registry, run_id, cfg, model_path, adapter_dir, kind="federated", privacy=privacy.budget
        )
    return FederatedOutcome(published, privacy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Federated LoRA rounds (Flower) on Ray")
    parser.add_argument("--config", required=True, help="YAML, e.g. configs/federated/demo.yaml")
    parser.add_argument("--state-dir", default=None, help="state directory (absolute in Ray jobs)")
    parser.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[fedforge] %(message)s")
    cfg = load_federated_config(args.config)
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
