"""Flower ServerApp: FedAvg over the LoRA adapter, replies validated, every round saved.

The strategy is FedAvg, wrapped in Flower's server-side fixed-clipping central DP when the
config asks for it, then in GuardedStrategy (outermost, so bad replies never reach clipping).
The config, the plan (noise, partitions) and the state dir come from Flower's run config.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from cluster.federated_config import FederatedConfig
from cluster.registry import Registry
from cluster.state import StateDir
from federated.adapter_state import adapter_to_arrays, load_adapter_dir
from federated.local_train import lora_model
from federated.plan import NoisePlan
from federated.privacy import recompute_epsilon
from federated.protocol import RoundMetrics, TrainTask
from federated.run_config import RunSpec
from federated.run_files import RunFiles
from federated.strategy import GuardedStrategy, RoundReport, build_strategy


def _epsilon_at(
    cfg: FederatedConfig, noise: NoisePlan | None
) -> Callable[[int, RoundMetrics | None], float | None]:
    dp = cfg.privacy

    def epsilon_at(server_round: int, metrics: RoundMetrics | None) -> float | None:
        if dp.mode == "local_dp":  # the clients account; the worst one's
            return metrics.epsilon if metrics else None
        if dp.mode == "central_dp":  # one Gaussian release of the average per round
            rate, sigma = noise.sample_rate, noise.noise_multiplier
            return recompute_epsilon(server_round, rate, sigma, dp.delta, dp.accountant)
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
        run = RunSpec.from_flower({**(run_config or {}), **context.run_config})
        cfg, noise = run.cfg, run.plan.noise
        model = lora_model(cfg, run.state.base_model(cfg.model.base), torch.device("cpu"))
        files = RunFiles(run.state, cfg.name)
        done = _start_adapter(cfg, run.state, files, model)
        if done >= cfg.federation.rounds:
            log(INFO, "%s already finished its %d rounds", cfg.name, cfg.federation.rounds)
            return

        def on_round(report: RoundReport, arrays: ArrayRecord | None) -> None:
            if arrays is not None:
                files.save_adapter(model, arrays, report.round)
            files.append_round(report)

        strategy = GuardedStrategy(
            build_strategy(cfg, noise),
            cfg.federation.max_update_norm,
            _epsilon_at(cfg, noise),
            on_round,
            done,
        )
        task = TrainTask(adapter_to_arrays(model), round_offset=done)
        strategy.start(
            grid=grid,
            initial_arrays=task.arrays,
            num_rounds=cfg.federation.rounds - done,
            train_config=task.config(),
        )

    return app


app = build_server_app()
