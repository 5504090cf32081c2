"""Privacy accounting: the noise a target needs, epsilon of a history (Opacus' accountants),
and the run's privacy record from its ledger.

Every release is charged in the privacy ledger (federated.privacy.ledger): each client keeps
its own (what it reports), the server keeps the run's (what is registered); epsilon is composed
with Opacus' accountant over every attempt of every round, re-runs and rejected replies included.
"""

from __future__ import annotations

import functools

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier

from cluster.core.errors import UserError
from cluster.core.federated_config import FederatedConfig
from cluster.records.privacy_record import ClientCharge, PrivacyRecord, RoundPrivacy
from federated.plan import FederatedPlan
from federated.privacy.ledger import Charge, History, ServerLedger, history_of, in_cluster_client
from federated.strategy import RoundReport

# Beyond this the noise drowns the clipped gradient (its norm is at most max_grad_norm per
# example, the noise's is sigma * max_grad_norm per coordinate): training cannot learn.
MAX_USEFUL_NOISE = 10.0
ORDERS = RDPAccountant.DEFAULT_ALPHAS  # what Opacus' RDP accountant evaluates


class PrivacyPlanError(UserError):
    """No noise meets the configured privacy target. The message is meant for users."""


def noise_for_target(
    target_epsilon: float,
    delta: float,
    rate: float,
    steps: int,
    accountant: str,
    max_noise: float = MAX_USEFUL_NOISE,
) -> float:
    """Noise multiplier meeting (target_epsilon, delta) after `steps`, else PrivacyPlanError."""
    where = (
        f"privacy.target_epsilon {target_epsilon} at delta {delta} over {steps} steps at "
        f"sampling rate {rate:.4g}"
    )
    hint = "raise target_epsilon or delta, or train fewer rounds/local_steps or smaller batches"
    try:
        noise = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=rate,
            steps=steps,
            accountant=accountant,
        )
    except ValueError as exc:  # Opacus gives up above a noise multiplier of 1e6
        raise PrivacyPlanError(f"{where} cannot be met by any noise ({exc}): {hint}") from None
    if noise > max_noise:
        raise PrivacyPlanError(
            f"{where} needs noise multiplier {noise:.1f}, above {max_noise}: noise that large "
            f"drowns the clipped gradients and the adapter learns nothing; {hint}"
        )
    return noise


def noise_for_target_after(
    target_epsilon: float,
    delta: float,
    clients: list[tuple[History, float]],
    steps: int,
    accountant: str,
    spent_rounds: int,
    max_noise: float = MAX_USEFUL_NOISE,
) -> float:
    """The smallest noise multiplier for `steps` more steps that keeps every client, composed
    with what it already spent (`clients`: (history, its rate)), within the target; else
    PrivacyPlanError saying what was spent."""

    def worst(noise: float) -> float:
        return max(epsilon_of([*h, (noise, rate, steps)], delta, accountant) for h, rate in clients)

    spent = max(epsilon_of(h, delta, accountant) for h, _ in clients)
    where = (
        f"privacy.target_epsilon {target_epsilon} at delta {delta}: the {spent_rounds} rounds "
        f"already run (and any re-run attempts) spent epsilon {spent:.3f}"
    )
    if steps == 0:
        if spent > target_epsilon:
            raise PrivacyPlanError(f"{where}, over the target")
        return max_noise
    if worst(max_noise) > target_epsilon:
        raise PrivacyPlanError(
            f"{where}; no noise multiplier up to {max_noise} keeps the remaining {steps} steps "
            "within the target: lower federation.rounds, or start a new run (a new name)"
        )
    low, high = 0.0, max_noise
    for _ in range(30):  # the smallest noise that meets the target, to 1e-8
        middle = (low + high) / 2
        if middle > 0 and worst(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high


def compact(history: History) -> History:
    """Entries with the same noise and rate merged (steps added): composition is additive, so
    the accountant's answer is the same, and computed once per distinct pair."""
    steps: dict[tuple[float, float], int] = {}
    for noise, rate, n in history:
        steps[(noise, rate)] = steps.get((noise, rate), 0) + n
    return [(noise, rate, n) for (noise, rate), n in steps.items() if n]


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(rate: float, noise: float) -> np.ndarray:
    """One step's RDP at every order (Opacus' analysis; a step costs ~0.1 s at small rates)."""
    return np.asarray(compute_rdp(q=rate, noise_multiplier=noise, steps=1, orders=ORDERS))


def epsilon_of(history: History, delta: float, accountant: str) -> float:
    """Epsilon of a history at `delta`: what Opacus' accountant of that kind reports for it."""
    history = compact(history)
    if not history:
        return 0.0
    if accountant == "rdp":  # RDPAccountant.get_epsilon, with each (rate, noise) computed once
        rdp = sum(steps * _rdp_per_step(rate, noise) for noise, rate, steps in history)
        return float(get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)[0])
    fresh = create_accountant(mechanism=accountant)
    fresh.history = history
    return float(fresh.get_epsilon(delta=delta))


def recompute_epsilon(
    steps: int, rate: float, noise_multiplier: float, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon from the logged numbers alone, independent of any training process."""
    return epsilon_of([(noise_multiplier, rate, steps)], delta, accountant)


def ledger_charges(
    cfg: FederatedConfig, plan: FederatedPlan, ledger: ServerLedger
) -> dict[str, list[Charge]]:
    """Every client's charges in the run's ledger (see ServerLedger.charges)."""
    rates = (
        {in_cluster_client(i): r for i, r in enumerate(plan.noise.sample_rates)}
        if plan.noise
        else {}
    )
    return ledger.charges(rates, central=cfg.privacy.mode == "central_dp")


def ledger_epsilons(
    cfg: FederatedConfig, plan: FederatedPlan, ledger: ServerLedger
) -> dict[str, float]:
    """Every client's epsilon from the run's ledger, at the configured delta ({} without DP)."""
    if plan.noise is None:
        return {}
    dp = cfg.privacy
    return {
        name: epsilon_of(history_of(charges), dp.delta, dp.accountant)
        for name, charges in ledger_charges(cfg, plan, ledger).items()
    }


def privacy_record(
    cfg: FederatedConfig, plan: FederatedPlan, rounds: list[RoundReport], ledger: ServerLedger
) -> PrivacyRecord:
    """The run's privacy guarantee and how it grew: what the registry and `privacy report` show.

    `epsilon` is the largest over every client that ever trained in the run, from the server's
    ledger (every attempt, re-runs and rejected replies included), or what a client reported
    for itself when that is larger. `histories` lets anyone recompute it with Opacus.
    """
    dp, noise = cfg.privacy, plan.noise
    by_round = [
        RoundPrivacy(round=r.round, epsilon=r.epsilon, clients=dict(r.epsilons)) for r in rounds
    ]
    if noise is None:
        return PrivacyRecord(mode="none", by_round=by_round)
    charges = ledger_charges(cfg, plan, ledger)
    final = {n: epsilon_of(history_of(c), dp.delta, dp.accountant) for n, c in charges.items()}
    reported = [m.epsilon for r in rounds for m in r.per_client.values() if m.epsilon is not None]
    worst_charge = [c for cs in charges.values() for c in cs]
    return PrivacyRecord(
        mode=dp.mode,
        epsilon=max([*final.values(), *reported], default=None),
        delta=dp.delta,
        noise_multiplier=min((c.noise for c in worst_charge), default=noise.noise_multiplier),
        max_grad_norm=dp.max_grad_norm,
        sample_rate=max((c.rate for c in worst_charge), default=noise.sample_rate),
        steps=max((sum(c.steps for c in cs) for cs in charges.values()), default=0),
        accountant=dp.accountant,
        by_round=by_round,
        clients=final,
        histories={
            n: [ClientCharge.model_validate(vars(c)) for c in cs] for n, cs in charges.items()
        },
    )
