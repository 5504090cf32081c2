"""Federated job configuration: the shared cluster sections plus federation, partition, privacy.

The YAML is validated once here; Flower's run config only carries the file path and the state dir
(see `flower_run_config`), so a typo fails before any SuperNode starts, not mid-round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cluster.config import (
    DataSettings,
    EvalSettings,
    LoraSettings,
    ModelSettings,
    RegistrySettings,
    Section,
    load_config,
)
from cluster.state import StateDir

# Beyond this the noise drowns the clipped gradient (its norm is at most max_grad_norm per
# example, the noise's is sigma * max_grad_norm per coordinate): training cannot learn.
MAX_USEFUL_NOISE = 10.0


class FederationSettings(Section):
    num_clients: int = Field(3, ge=1, description="Data partitions, one per SuperNode.")
    rounds: int = Field(2, ge=1, description="Federated rounds (FedAvg aggregations).")
    fraction_train: float = Field(
        1.0, gt=0, le=1, description="Share of connected nodes sampled for each round."
    )
    min_train_nodes: int = Field(2, ge=1, description="Fewest nodes a round trains on.")
    min_available_nodes: int = Field(2, ge=1, description="Nodes that must be connected to start.")
    local_steps: int = Field(5, ge=1, description="Optimizer steps per client per round.")
    batch_size: int = Field(
        4, ge=1, description="Examples per local step (the expected size under DP's sampling)."
    )
    learning_rate: float = Field(2e-3, gt=0, description="Local AdamW learning rate.")
    seed: int = Field(0, description="Seed of the initial LoRA matrices and the local data order.")
    max_update_norm: float = Field(
        50.0,
        gt=0,
        description="L2 norm of (client adapter - global adapter) above which the server "
        "rejects the update as corrupt or malicious.",
    )


class PartitionSettings(Section):
    scheme: Literal["iid", "dirichlet", "by_label"] = Field(
        "iid",
        description="'iid' deals examples at random; 'dirichlet' draws each label's share per "
        "client from Dirichlet(alpha); 'by_label' gives every label value to one client.",
    )
    key: str = Field("team", description="Example metadata key that labels non-IID skew.")
    alpha: float = Field(
        0.5, gt=0, description="Dirichlet concentration: small = skewed, large = near IID."
    )
    min_examples: int = Field(
        8, ge=1, description="Fewest examples a client may get; Dirichlet draws are retried."
    )
    seed: int = Field(0, description="Seed of the partition; same seed, same split.")


class PrivacySettings(Section):
    mode: Literal["none", "local_dp", "central_dp"] = Field(
        "none",
        description="'local_dp': Opacus DP-SGD on each client (example-level); 'central_dp': "
        "the server clips each client's update and noises the aggregate (client-level).",
    )
    noise_multiplier: float | None = Field(
        None, ge=0, description="Noise std / clipping norm. Give this or target_epsilon."
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="Privacy budget to meet after all rounds; the noise is derived."
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="Delta of the (epsilon, delta) guarantee.")
    max_grad_norm: float = Field(
        1.0,
        gt=0,
        description="Clipping norm: per example (local_dp) or per client update (central_dp).",
    )
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus privacy accountant.")

    @model_validator(mode="after")
    def _one_way_to_set_noise(self) -> PrivacySettings:
        given = (self.noise_multiplier is not None) + (self.target_epsilon is not None)
        if self.mode != "none" and given != 1:
            raise ValueError(
                f"privacy.mode {self.mode} needs exactly one of privacy.noise_multiplier "
                "and privacy.target_epsilon"
            )
        return self


class FederatedConfig(Section):
    name: str = Field(
        description="Run name: names the run's folder under the state dir.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
    )
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings
    lora: LoraSettings = Field(default_factory=LoraSettings)
    federation: FederationSettings = Field(default_factory=FederationSettings)
    partition: PartitionSettings = Field(default_factory=PartitionSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)

    @model_validator(mode="after")
    def _nodes_fit(self) -> FederatedConfig:
        fed = self.federation
        if max(fed.min_train_nodes, fed.min_available_nodes) > fed.num_clients:
            raise ValueError(
                f"federation.min_train_nodes ({fed.min_train_nodes}) and min_available_nodes "
                f"({fed.min_available_nodes}) cannot exceed num_clients ({fed.num_clients})"
            )
        return self

    @model_validator(mode="after")
    def _target_epsilon_is_reachable(self) -> FederatedConfig:
        if self.privacy.mode != "none" and self.privacy.target_epsilon is not None:
            self.noise_multiplier()  # raises ValueError with the reason when infeasible
        return self

    def sampled_clients(self) -> int:
        """Clients per round, as FedAvg samples them."""
        fed = self.federation
        return max(int(fed.num_clients * fed.fraction_train), fed.min_train_nodes)

    def dp_steps_and_rate(self) -> tuple[int, float]:
        """Accounted steps and the worst (largest) sampling rate over all clients."""
        from federated.partition import client_partitions
        from federated.privacy import sample_rate

        fed = self.federation
        if self.privacy.mode == "central_dp":  # one Gaussian release per round
            return fed.rounds, self.sampled_clients() / fed.num_clients
        smallest = min(len(part) for part in client_partitions(self))
        return fed.rounds * fed.local_steps, sample_rate(smallest, fed.batch_size)

    def noise_multiplier(self) -> float:
        """The configured noise, or the noise that meets target_epsilon for every client."""
        from federated.privacy import noise_for_target

        if self.privacy.noise_multiplier is not None:
            return self.privacy.noise_multiplier
        steps, rate = self.dp_steps_and_rate()
        return noise_for_target(
            self.privacy.target_epsilon,
            self.privacy.delta,
            rate,
            steps,
            self.privacy.accountant,
            MAX_USEFUL_NOISE,
        )


def load_federated_config(path: str | Path) -> FederatedConfig:
    return load_config(path, FederatedConfig)


def flower_run_config(config_path: str | Path, state: StateDir) -> dict[str, str]:
    """Flower's run config: where the validated YAML and the state dir are, nothing else."""
    load_federated_config(config_path)  # refuse an invalid file before Flower sees it
    return {"config": str(Path(config_path).resolve()), "state-dir": str(state.root)}


def from_run_config(run_config: dict) -> tuple[FederatedConfig, StateDir]:
    return load_federated_config(run_config["config"]), StateDir.resolve(run_config["state-dir"])
