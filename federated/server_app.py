"""Flower ServerApp: rounds over the LoRA adapter, replies guarded, every release in the ledger.

The strategy (federated.strategy.GuardedStrategy) samples with FedAvg, checks each reply on its
own, aggregates with server-set weights (or central DP) and logs every attempt and reply in the
run's privacy ledger. The config, the plan (noise, partitions) and the state dir come from
Flower's run config. A round is saved in this order: its line in rounds.jsonl, its adapter
directory, then "done" in the ledger; a crash in between re-runs it (and charges it again).
"""

from __future__ import annotations

import tempfile
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from cluster.core.federated_config import FederatedConfig
from cluster.core.state import StateDir
from cluster.records.registry import Registry
from federated.adapter_state import adapter_to_arrays, load_adapter_dir
from federated.local_train import lora_model
from federated.privacy.accounting import ledger_epsilons
from federated.privacy.ledger import ServerLedger
from federated.run_config import RunSpec
from federated.run_files import RunFiles
from federated.strategy import GuardedStrategy, JoinTimeout, RoundReport


def _start_adapter(cfg: FederatedConfig, state: StateDir, files: RunFiles, model) -> int:
    """Load the adapter the rounds start from into `model`; returns the rounds already done.

    A run that saved rounds before (it crashed or was stopped) continues from its last saved
    round; a new run starts from the registered adapter named in the config, or a fresh one.
    """
    done = files.latest_round()
    if done:
        load_adapter_dir(model, files.adapter_dir(done))
        log(INFO, "resuming %s after round %d (saved in %s)", cfg.name, done, files.root)
        return done
    if cfg.federation.initial_adapter:
        name, _, ref = cfg.federation.initial_adapter.rpartition(":")
        registry = Registry.from_settings(cfg.registry, state)
        with tempfile.TemporaryDirectory() as tmp:
            load_adapter_dir(model, registry.download(name, ref, Path(tmp)))
        log(INFO, "starting from registered adapter %s", cfg.federation.initial_adapter)
    files.save_adapter(model, adapter_to_arrays(model), 0)
    return 0


def serve_rounds(run: RunSpec, grid: Grid) -> None:
    """The server's side of a run's remaining rounds, over `grid` (Flower's, or a test's)."""
    cfg = run.cfg
    model = lora_model(cfg, run.state.base_model(cfg.model.base), torch.device("cpu"))
    files = RunFiles(run.state, cfg.name)
    done = _start_adapter(cfg, run.state, files, model)
    if done >= cfg.federation.rounds:
        log(INFO, "%s already finished its %d rounds", cfg.name, cfg.federation.rounds)
        return
    ledger = ServerLedger(files.root)

    def on_round(report: RoundReport, arrays: ArrayRecord) -> None:
        files.save_round(model, report, arrays)

    strategy = GuardedStrategy(
        cfg, run.plan, ledger, lambda: ledger_epsilons(cfg, run.plan, ledger), on_round, done
    )
    try:
        strategy.start(
            grid=grid,
            initial_arrays=adapter_to_arrays(model),
            num_rounds=cfg.federation.rounds - done,
        )
    except JoinTimeout as exc:
        files.write_error(str(exc))  # the job names it in its own error
        raise


def build_server_app(run_config: dict[str, str] | None = None) -> ServerApp:
    """The ServerApp; `run_config` stands in for Flower's where none is passed (simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve_rounds(RunSpec.from_flower({**(run_config or {}), **context.run_config}), grid)

    return app


app = build_server_app()
