"""The privacy audit on the demo model in the shipped demo configuration, three ways: DP on, DP
off (`privacy.mode: none`), and DP on with a training profile of the old kind planted among the
registry's files. Prints a Markdown table (docs/PRIVACY.md has the last one) and writes each
audit's report to <state>/reports/.

    nice -n 10 .venv/bin/python scripts/audit_privacy.py [--state-dir .fedforge] \
        [--config configs/federated/demo.yaml] [--canaries 1000] [--guesses 250] [--seed 1]

The config is used as shipped, except `federation.initial_adapter` when the registry has no
such version: the rounds then start from a fresh adapter (the audit needs a starting point,
not that one). The planted audit scores the DP-on run again with the profile added: training
does not read the registry's files, so a second run would only cost time.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

from cluster.core.config import load_config
from cluster.core.federated_config import FederatedConfig
from cluster.core.state import StateDir
from cluster.records.registry import Registry, RegistryError
from federated.audit import (
    VIEWS,
    AuditResult,
    AuditSettings,
    run_audit,
    score_run,
    train_run,
    write_report,
)


def starting_point(cfg: FederatedConfig, state: StateDir) -> FederatedConfig:
    """The config, without its initial adapter if this state dir's registry lacks it."""
    ref = cfg.federation.initial_adapter
    if not ref:
        return cfg
    name, _, version = ref.rpartition(":")
    try:
        Registry.from_settings(cfg.registry, state).get(name, version)
        return cfg
    except RegistryError:
        print(f"[audit] {ref} is not registered here: the rounds start from a fresh adapter")
        federation = cfg.federation.model_copy(update={"initial_adapter": None})
        return cfg.model_copy(update={"federation": federation})


def without_dp(cfg: FederatedConfig) -> FederatedConfig:
    privacy = cfg.privacy.model_copy(update={"mode": "none"})
    return cfg.model_copy(update={"privacy": privacy})


def reported(label: str, result: AuditResult, started: float, state: StateDir):
    """(label, result, minutes since `started`), its report written."""
    minutes = (time.monotonic() - started) / 60
    print(f"[audit] {label}: {minutes:.1f} min, report {write_report(state, result)}", flush=True)
    return label, result, minutes


def row(label: str, result: AuditResult, minutes: float) -> str:
    eps = "n/a" if result.reported_epsilon is None else f"{result.reported_epsilon:.3f}"
    views = " | ".join(
        f"{result.views[v].bound:.3f} ({result.views[v].correct}/{result.views[v].guesses})"
        for v in VIEWS
    )
    return (
        f"| {label} | {eps} | **{result.lower_bound:.3f}** | {result.ceiling:.3f} | {views} "
        f"| {minutes:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", default=None, help="state directory (default: ./.fedforge)")
    parser.add_argument("--config", default="configs/federated/demo.yaml")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--guesses", type=int, default=250)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    state = StateDir.resolve(args.state_dir)
    cfg = starting_point(load_config(args.config, FederatedConfig), state)
    settings = AuditSettings(canaries=args.canaries, guesses=args.guesses, seed=args.seed)
    planted = dataclasses.replace(settings, plant_profile=True)

    started = time.monotonic()
    run = train_run(cfg, state, settings)
    rows = [reported("DP on", score_run(run, settings), started, state)]
    started = time.monotonic()
    rows.append(reported("DP on, old profile planted", score_run(run, planted), started, state))
    started = time.monotonic()
    rows.append(reported("DP off", run_audit(without_dp(cfg), state, settings), started, state))
    first = rows[0][1]
    print(
        f"\n{args.config}, {args.canaries} canaries ({first.included} included), {args.guesses} "
        f"one-sided guesses per view, confidence {first.confidence:g} ({first.view_confidence:.4f} "
        f"per view), delta {first.delta:g}, seed {args.seed}; {first.date}; {first.machine}\n"
    )
    print("| run | reported ε | bound | ceiling | " + " | ".join(VIEWS) + " | minutes |")
    print("|---|---|---|---|" + "---|" * len(VIEWS) + "---|")
    for label, result, minutes in rows:
        print(row(label, result, minutes))


if __name__ == "__main__":
    main()
