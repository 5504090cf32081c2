"""Flower ServerApp: FedAvg over the LoRA adapter, replies validated, every round saved.

The strategy is FedAvg, wrapped in Flower's server-side fixed-clipping central DP when the
config asks for it, then in GuardedStrategy (outermost, so bad replies never reach clipping).
"""

from __future__ import annotations

import tempfile
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy

from cluster.registry import Registry
from cluster.state import StateDir
from federated.adapter_state import adapter_to_arrays, load_adapter_dir
from federated.client_app import ROUND_OFFSET_KEY
from federated.config import FederatedConfig, from_run_config
from federated.local_train import lora_model
from federated.privacy import recompute_epsilon
from federated.run_files import RunFiles
from federated.strategy import GuardedStrategy, aggregate_train_metrics
from llm.model import resolve_model_path


def _strategy(cfg: FederatedConfig) -> Strategy:
    fed = cfg.federation
    central = cfg.privacy.mode == "central_dp"
    fedavg = FedAvg(
        fraction_train=fed.fraction_train,
        fraction_evaluate=0.0,  # held-out evaluation runs on the server, after the rounds
        min_train_nodes=fed.min_train_nodes,
        min_available_nodes=fed.min_available_nodes,
        weighted_by_key="unit-weight" if central else "num-examples",
        train_metrics_aggr_fn=aggregate_train_metrics,
    )
    if not central:
        return fedavg
    return DifferentialPrivacyServerSideFixedClipping(
        fedavg,
        noise_multiplier=cfg.noise_multiplier(),
        clipping_norm=cfg.privacy.max_grad_norm,
        num_sampled_clients=cfg.sampled_clients(),
    )


def _epsilon_at(cfg: FederatedConfig):
    dp = cfg.privacy
    rate = cfg.sampled_clients() / cfg.federation.num_clients

    def epsilon_at(server_round: int, metrics: MetricRecord | None) -> float | None:
        if dp.mode == "local_dp":
            return float(metrics["epsilon"]) if metrics else None
        if dp.mode == "central_dp":  # one Gaussian release of the average per round
            noise = cfg.noise_multiplier()
            return recompute_epsilon(server_round, rate, noise, dp.delta, dp.accountant)
        return None

    return epsilon_at


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


def build_server_app(run_config: dict[str, str] | None = None) -> ServerApp:
    """The ServerApp; `run_config` stands in for Flower's where none is passed (simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg, state = from_run_config({**(run_config or {}), **context.run_config})
        model = lora_model(cfg, resolve_model_path(cfg.model.base, state), torch.device("cpu"))
        files = RunFiles(state, cfg.name)
        done = _start_adapter(cfg, state, files, model)
        if done >= cfg.federation.rounds:
            log(INFO, "%s already finished its %d rounds", cfg.name, cfg.federation.rounds)
            return

        def on_round(report) -> None:
            if report.arrays is not None:
                files.save_adapter(model, report.arrays, report.round)
            files.append_round(report)

        strategy = GuardedStrategy(
            _strategy(cfg), cfg.federation.max_update_norm, _epsilon_at(cfg), on_round, done
        )
        strategy.start(
            grid=grid,
            initial_arrays=adapter_to_arrays(model),
            num_rounds=cfg.federation.rounds - done,
            train_config=ConfigRecord({ROUND_OFFSET_KEY: done}),
        )

    return app


app = build_server_app()
