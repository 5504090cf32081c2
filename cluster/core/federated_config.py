"""Federated job configuration: the shared sections plus federation, partition, privacy, flower.

Pure data: validators check types, ranges and consistency only. What follows from the config
(client partitions, the DP noise plan) is computed once when the job starts (federated.planning
makes a federated.plan) and travels to the ServerApp and ClientApps with the run.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cluster.core.config import Section, TrainingJobConfig


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
    initial_adapter: str | None = Field(
        None,
        description="Start from a registered adapter, '<model name>:<version or alias>' (e.g. "
        "fedforge-demo:candidate); default: a fresh LoRA adapter. Its LoRA shape must match.",
    )
    max_update_norm: float = Field(
        50.0,
        gt=0,
        description="L2 norm of (client adapter - global adapter) above which the server "
        "rejects the update as corrupt or malicious.",
    )


class FlowerSettings(Section):
    """Where the SuperLink listens and how SuperNodes prove who they are."""

    host: str | None = Field(
        None,
        description="Name or IP outside SuperNodes use to reach the SuperLink (and the name in "
        "its TLS certificate). Default: the IP of the Ray node the SuperLink runs on.",
    )
    fleet_port: int = Field(
        9092,
        ge=1,
        le=65535,
        description="Fleet API: SuperNodes connect here. It listens on loopback only unless "
        "tls and supernode_auth are both on.",
    )
    control_port: int = Field(9093, ge=1, le=65535, description="Control API (loopback only).")
    serverappio_port: int = Field(9091, ge=1, le=65535, description="ServerAppIo (loopback only).")
    tls: bool = Field(
        False, description="Serve the Fleet API over TLS; needed for supernode authentication."
    )
    certs_dir: str | None = Field(
        None,
        description="Directory with ca.crt, server.pem, server.key (python -m federated.certs "
        "tls). Default: made per run for `host` under the run's folder.",
    )
    supernode_auth: bool = Field(
        False, description="Only SuperNodes whose public key is registered may join."
    )
    authorized_keys: list[str] = Field(
        default_factory=list,
        description="Public key files (OpenSSH EC) of outside SuperNodes allowed to join.",
    )
    external_clients: int = Field(
        0,
        ge=0,
        description="Outside SuperNodes expected besides the in-cluster ones (needs tls and "
        "supernode_auth).",
    )
    external_min_examples: int = Field(
        32,
        ge=1,
        description="Fewest examples an outside client may train on: local DP's noise is "
        "calibrated for its sampling rate, and a client with less data refuses to train.",
    )
    external_max_examples: int = Field(
        10_000,
        ge=1,
        description="Most examples an outside client may claim (a reply claiming more is "
        "rejected); its FedAvg weight is its count, never above the largest in-cluster "
        "partition.",
    )
    aggregation_weights: Literal["examples", "equal"] = Field(
        "examples",
        description="FedAvg weights: 'examples' weighs an in-cluster client by its partition's "
        "size and an outside client by the examples it claims, capped as above; 'equal' gives "
        "every client the same weight, whatever it claims (central_dp always does).",
    )
    join_timeout_s: float = Field(
        600.0,
        gt=0,
        description="How long a round waits for federation.min_available_nodes SuperNodes to "
        "be connected; then the run ends with an error naming who is missing.",
    )
    cpus_per_supernode: float = Field(
        0.5, gt=0, description="Ray CPUs reserved by each in-cluster SuperNode."
    )
    warm_clients: bool = Field(
        True,
        description="In-cluster SuperNodes hand training to a long-lived Ray actor that keeps "
        "imports and the base model loaded between rounds (Flower starts a fresh ClientApp "
        "process per message). False: train in that process, like an outside SuperNode.",
    )
    gpus_per_supernode: float = Field(0, ge=0, description="Ray GPUs per in-cluster SuperNode.")

    @property
    def secure(self) -> bool:
        """TLS and node authentication both on: only then is the Fleet API reachable from
        other machines."""
        return self.tls and self.supernode_auth

    @model_validator(mode="after")
    def _auth_needs_tls(self) -> FlowerSettings:
        if self.supernode_auth and not self.tls:
            raise ValueError("flower.supernode_auth needs flower.tls: true (Flower's rule)")
        return self

    @model_validator(mode="after")
    def _open_only_when_secure(self) -> FlowerSettings:
        wants_outside = {"flower.external_clients > 0": self.external_clients > 0}
        wants_outside["flower.host"] = self.host is not None
        asked = [key for key, on in wants_outside.items() if on]
        if asked and not self.secure:
            raise ValueError(
                f"{' and '.join(asked)} open(s) the Fleet API to other machines: that needs "
                "flower.tls: true and flower.supernode_auth: true (an outside SuperNode must "
                "present a registered key over TLS)"
            )
        if self.external_min_examples > self.external_max_examples:
            raise ValueError("flower.external_min_examples exceeds flower.external_max_examples")
        return self


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
    budget_epsilon: float | None = Field(
        None,
        gt=0,
        description="The registered model's privacy budget, adopted only if the model has none "
        "yet (then changed only by `fedforge registry budget`, audited): the epsilon at "
        "privacy.delta that no data source may pass, composed per example over a version's "
        "ancestry. Promote, rollback and the gate refuse a version past it. null = none asked.",
    )

    @model_validator(mode="after")
    def _one_way_to_set_noise(self) -> PrivacySettings:
        given = (self.noise_multiplier is not None) + (self.target_epsilon is not None)
        if self.mode != "none" and given != 1:
            raise ValueError(
                f"privacy.mode {self.mode} needs exactly one of privacy.noise_multiplier "
                "and privacy.target_epsilon"
            )
        return self


class FederatedConfig(TrainingJobConfig):
    federation: FederationSettings = Field(default_factory=FederationSettings)
    partition: PartitionSettings = Field(default_factory=PartitionSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    flower: FlowerSettings = Field(default_factory=FlowerSettings)

    @model_validator(mode="after")
    def _nodes_fit(self) -> FederatedConfig:
        fed = self.federation
        nodes = fed.num_clients + self.flower.external_clients
        if max(fed.min_train_nodes, fed.min_available_nodes) > nodes:
            raise ValueError(
                f"federation.min_train_nodes ({fed.min_train_nodes}) and min_available_nodes "
                f"({fed.min_available_nodes}) cannot exceed num_clients ({fed.num_clients}) "
                f"plus flower.external_clients ({self.flower.external_clients})"
            )
        return self

    def sampled_clients(self) -> int:
        """Clients per round, as FedAvg samples them."""
        fed = self.federation
        return max(int(fed.num_clients * fed.fraction_train), fed.min_train_nodes)
