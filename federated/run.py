"""Federated DP fine-tuning of a LoRA adapter: Flower rounds on Ray, then evaluation and registry.

    ray job submit --working-dir . -- python -m federated.run \
        --config configs/federated/demo.yaml --state-dir "$PWD/.fedforge"

Every round's global adapter is saved; submitting the same `name` again resumes after the last
saved round. The final adapter is registered with its privacy budget in the lineage, alias
`candidate`.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from dataclasses import dataclass

from tqdm import tqdm

from cluster.config import ConfigError
from cluster.lineage import PRIVACY_FILE, lineage_tags
from cluster.ray_cluster import connect
from cluster.registry import Registry, RegistryError
from cluster.state import StateDir
from federated.config import FederatedConfig, load_federated_config
from federated.federation import Federation, FederationError
from federated.partition import PartitionError, client_partitions
from federated.privacy import privacy_record
from federated.run_files import RunFiles
from llm.data import DatasetError, dataset_sha256
from llm.evaluate import EvalResult, evaluate_heldout
from llm.model import ModelNotFoundError, resolve_model_path
from llm.run_identity import RunMismatchError, check_or_record, flatten

# What may change when a run is submitted again: how many rounds, how it is served and judged,
# and where round 0 came from (read only when no round is saved yet).
RESUMABLE_KEYS = {"federation.rounds", "federation.initial_adapter"}
RESUMABLE_SECTIONS = ("eval.", "registry.", "flower.")


@dataclass(frozen=True)
class FederatedOutcome:
    version: str
    base: EvalResult
    federated: EvalResult
    epsilon: float | None
    delta: float
    rounds: list[dict]


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
    model_path = resolve_model_path(cfg.model.base, state)
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
    print("[fedforge] evaluating base model and federated adapter on held-out data", flush=True)
    base = evaluate_heldout(cfg, model_path, None)
    tuned = evaluate_heldout(cfg, model_path, adapter_dir)
    privacy = privacy_record(cfg, history)
    (adapter_dir / PRIVACY_FILE).write_text(json.dumps(privacy, indent=2))
    registry = Registry.from_settings(cfg.registry, state)
    metrics = {**tuned.as_metrics(), "base_accuracy": base.accuracy}
    params = {"config." + k: v for k, v in flatten(cfg.model_dump(mode="json")).items()}
    with registry.run(cfg.registry.experiment, cfg.name, params) as run_id:
        for entry in history:
            per_round = {"train_loss": entry["train_loss"], "epsilon": entry["epsilon"]}
            registry.log_metrics(
                run_id, {k: v for k, v in per_round.items() if v is not None}, entry["round"]
            )
        registry.log_metrics(run_id, metrics)
        tags = lineage_tags(
            kind="federated",
            config=cfg,
            base_model=cfg.model.base,
            dataset_sha256=dataset_sha256(cfg.data.path),
            metrics=metrics,
            extra={
                "run_name": cfg.name,
                "validation_examples": str(tuned.examples),
                **{f"privacy.{k}": str(v) for k, v in privacy.items() if k != "by_round"},
            },
        )
        version = registry.register_adapter(cfg.registry.model_name, adapter_dir, run_id, tags)
    return FederatedOutcome(
        version.version, base, tuned, privacy["epsilon"], cfg.privacy.delta, history
    )


def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # unwinds, so every Flower process stops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Federated LoRA rounds (Flower) on Ray")
    parser.add_argument("--config", required=True, help="YAML, e.g. configs/federated/demo.yaml")
    parser.add_argument("--state-dir", default=None, help="state directory (absolute in Ray jobs)")
    parser.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[fedforge] %(message)s")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)  # what `ray job stop` sends
    try:
        cfg = load_federated_config(args.config)
        outcome = run_federated(cfg, StateDir.resolve(args.state_dir), args.address)
    except (
        ConfigError,
        DatasetError,
        ModelNotFoundError,
        PartitionError,
        RunMismatchError,
        FederationError,
        RegistryError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    eps = f"{outcome.epsilon:.3f}" if outcome.epsilon is not None else "n/a (no DP)"
    print(
        f"[fedforge] registered {cfg.registry.model_name} v{outcome.version} (alias candidate): "
        f"held-out accuracy base {outcome.base.accuracy:.1%} -> federated "
        f"{outcome.federated.accuracy:.1%}; privacy epsilon {eps} at delta {outcome.delta:g}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
