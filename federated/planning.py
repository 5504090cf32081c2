"""Computing the plan of a federated run, once, when the job starts (before Ray or Flower).

A config that cannot be planned fails here, naming its key: a missing dataset or an impossible
split (`PartitionError`), an unreachable `privacy.target_epsilon` (`PrivacyPlanError`). A resumed
run is planned against what its ledger already charged: under a target epsilon the rounds still
to run get the noise that keeps every client's composed epsilon within the target, or the plan
is refused with what was spent. A ledger that lost an event refuses to plan (LedgerError).
"""

from __future__ import annotations

from cluster.core.federated_config import FederatedConfig
from federated.partition import partition_indices
from federated.plan import FederatedPlan, NoisePlan
from federated.privacy.accounting import noise_for_target, noise_for_target_after
from federated.privacy.ledger import (
    History,
    ServerLedger,
    history_of,
    in_cluster_client,
    sample_rate,
)
from llm.data import load_split


def plan_noise(
    cfg: FederatedConfig,
    partitions: list[list[int]],
    spent: dict[str, History] | None = None,
    spent_rounds: int = 0,
) -> NoisePlan | None:
    """The noise of the run, and the steps and sampling rates its accounting assumes.

    `spent`: each client's charges so far (a resumed run), `spent_rounds`: its saved rounds.
    """
    dp, fed = cfg.privacy, cfg.federation
    if dp.mode == "none":
        return None
    if dp.mode == "central_dp":  # one Gaussian release per round; no client-sampling amplification
        per_round, rates, outside = 1, [1.0] * fed.num_clients, None
    else:  # Poisson-sampled examples, every local step of every round
        per_round = fed.local_steps
        rates = [sample_rate(len(part), fed.batch_size) for part in partitions]
        outside = (
            sample_rate(cfg.flower.external_min_examples, fed.batch_size)
            if cfg.flower.external_clients
            else None
        )
    worst = max([*rates, outside or 0.0])
    noise = dp.noise_multiplier
    if noise is None and spent:
        remaining = max(0, fed.rounds - spent_rounds) * per_round
        clients = [(spent.get(in_cluster_client(i), []), r) for i, r in enumerate(rates)]
        clients += [(h, max(x[1] for x in h)) for n, h in spent.items() if not n.isdigit() and h]
        if outside:
            clients.append(([], outside))  # an outside client that joins now
        noise = noise_for_target_after(
            dp.target_epsilon, dp.delta, clients, remaining, dp.accountant, spent_rounds
        )
    elif noise is None:
        noise = noise_for_target(
            dp.target_epsilon, dp.delta, worst, fed.rounds * per_round, dp.accountant
        )
    return NoisePlan(
        noise_multiplier=noise,
        sample_rates=rates,
        steps=fed.rounds * per_round,
        steps_per_round=per_round,
        outside_rate=outside,
        spent_rounds=spent_rounds,
    )


def spent_so_far(
    cfg: FederatedConfig, partitions: list[list[int]], ledger: ServerLedger
) -> dict[str, History]:
    """What the run's ledger charged every client so far (empty for a new run)."""
    if cfg.privacy.mode == "none":
        return {}
    rates = {
        in_cluster_client(i): sample_rate(len(p), cfg.federation.batch_size)
        for i, p in enumerate(partitions)
    }
    charges = ledger.charges(rates, central=cfg.privacy.mode == "central_dp")
    return {name: history_of(c) for name, c in charges.items()}


def make_plan(
    cfg: FederatedConfig, ledger: ServerLedger | None = None, spent_rounds: int = 0
) -> FederatedPlan:
    pool = load_split(cfg.data).train
    partitions = partition_indices(pool, cfg.federation.num_clients, cfg.partition)
    if ledger:
        ledger.repair()  # a line a crash cut short, before the resumed run appends anything
    spent = spent_so_far(cfg, partitions, ledger) if ledger else {}
    return FederatedPlan(
        pool_size=len(pool),
        partitions=partitions,
        noise=plan_noise(cfg, partitions, spent, spent_rounds),
    )
