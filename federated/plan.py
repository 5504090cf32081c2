"""The plan of a federated run: what follows from its config, computed once when the job starts.

`federated.planning.make_plan` derives it (it reads the data and runs Opacus' noise search); it
then travels as JSON in Flower's run config, so the ServerApp and every ClientApp use the same
partitions and noise without recomputing them. Light imports only: ClientApps read it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class NoisePlan(BaseModel):
    """The DP noise of the run and what its accounting assumes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_multiplier: float = Field(
        description="privacy.noise_multiplier, or the noise that meets privacy.target_epsilon."
    )
    sample_rates: list[float] = Field(
        description="Per in-cluster client (partition id): its chance to be in one accounted "
        "step; per example of its partition (local_dp) or per round (central_dp)."
    )
    steps: int = Field(
        description="Accounted steps per client over all rounds: rounds x local_steps "
        "(local_dp) or rounds (central_dp)."
    )
    steps_per_round: int = Field(
        1, description="Accounted steps per client and round: local_steps, or 1 (central_dp)."
    )
    outside_rate: float | None = Field(
        None,
        description="local_dp with outside clients: the rate of one with the fewest examples "
        "it may bring (flower.external_min_examples); the noise is calibrated for it too, and "
        "a client with less data refuses to train.",
    )
    spent_rounds: int = Field(
        0, description="Rounds a resumed run had already run (at the noise they ran with)."
    )

    @property
    def sample_rate(self) -> float:
        """The worst (largest) rate: the noise is set so that this client meets the target."""
        return max([*self.sample_rates, self.outside_rate or 0.0])


class FederatedPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pool_size: int = Field(
        description="Examples in the clients' share of the training split (data.share), the "
        "pool the partitions index into; every node must see the same pool."
    )
    partitions: list[list[int]] = Field(
        description="Per in-cluster client (partition id): its indices into the pool."
    )
    noise: NoisePlan | None = Field(None, description="None without DP (privacy.mode none).")
