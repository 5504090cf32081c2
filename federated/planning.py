"""Computing the plan of a federated run, once, when the job starts (before Ray or Flower).

A config that cannot be planned fails here, naming its key: a missing dataset or an impossible
split (`PartitionError`), an unreachable `privacy.target_epsilon` (`PrivacyPlanError`).
"""

from __future__ import annotations

from cluster.federated_config import FederatedConfig
from federated.partition import partition_indices
from federated.plan import FederatedPlan, NoisePlan
from federated.privacy import noise_for_target, sample_rate
from llm.data import load_split


def plan_noise(cfg: FederatedConfig, partitions: list[list[int]]) -> NoisePlan | None:
    """The noise of the run, and the steps and sampling rates its accounting assumes."""
    dp, fed = cfg.privacy, cfg.federation
    if dp.mode == "none":
        return None
    if dp.mode == "central_dp":  # one Gaussian release per round, clients sampled by FedAvg
        steps, rates = fed.rounds, [cfg.sampled_clients() / fed.num_clients] * fed.num_clients
    else:  # Poisson-sampled examples, every local step of every round
        steps = fed.rounds * fed.local_steps
        rates = [sample_rate(len(part), fed.batch_size) for part in partitions]
    noise = dp.noise_multiplier
    if noise is None:
        noise = noise_for_target(dp.target_epsilon, dp.delta, max(rates), steps, dp.accountant)
    return NoisePlan(noise_multiplier=noise, sample_rates=rates, steps=steps)


def make_plan(cfg: FederatedConfig) -> FederatedPlan:
    pool = load_split(cfg.data).train
    partitions = partition_indices(pool, cfg.federation.num_clients, cfg.partition)
    return FederatedPlan(
        pool_size=len(pool), partitions=partitions, noise=plan_noise(cfg, partitions)
    )
