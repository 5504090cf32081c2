"""Flower ServerApp: FedAvg over the LoRA adapter, replies validated, every round saved.

The strategy is FedAvg, wrapped in Flower's server-side fixed-clipping central DP when the
config asks for it, then in GuardedStrategy (outermost, so bad replies never reach clipping).
"""

from __future__ import annotations

import torch
from flwr.app import Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy

from federated.adapter_state import adapter_to_arrays
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


def build_server_app(run_config: dict[str, str] | None = None) -> ServerApp:
    """The ServerApp; `run_config` stands in for Flower's where none is passed (simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg, state = from_run_config({**(run_config or {}), **context.run_config})
        model = lora_model(cfg, resolve_model_path(cfg.model.base, state), torch.device("cpu"))
        files = RunFiles(state, cfg.name)
        initial = adapter_to_arrays(model)
        files.save_adapter(model, initial, 0)

        def on_round(report) -> None:
            files.append_round(report)
            if report.arrays is not None:
                files.save_adapter(model, report.arrays, report.round)

        strategy = GuardedStrategy(
            _strategy(cfg), cfg.federation.max_update_norm, _epsilon_at(cfg), on_round
        )
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.federation.rounds,
        )

    return app


app = build_server_app()
