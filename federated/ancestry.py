"""Epsilon across versions: what a version's whole ancestry spent of each data source.

A federated run that starts from a registered adapter (`federation.initial_adapter`) releases
more about the data its ancestors trained on. Per data source (a dataset and the share of it
used, `cluster.privacy_record.data_source`), this composes every federated run on it in the
ancestry with Opacus' RDP analysis: per RDP order, the largest RDP of any client in a run (so
it holds whichever client an example belongs to, even under another partition), summed over
runs, then converted to epsilon at the run's delta. An ancestor that used the data without DP
(central fine-tuning on an overlapping share) leaves no guarantee: epsilon None.
"""

from __future__ import annotations

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from cluster.federated_config import FederatedConfig
from cluster.privacy_record import (
    ClientCharge,
    DataPrivacy,
    PrivacyRecord,
    SourceRdp,
    data_source,
    sources_overlap,
)

RDP_ORDERS = list(RDPAccountant.DEFAULT_ALPHAS)


def run_rdp(histories: dict[str, list[ClientCharge]]) -> np.ndarray:
    """Per order, the largest RDP over the run's clients of everything charged to them."""
    worst = np.zeros(len(RDP_ORDERS))
    for charges in histories.values():
        total = sum(
            (
                np.asarray(
                    compute_rdp(
                        q=c.rate, noise_multiplier=c.noise, steps=c.steps, orders=RDP_ORDERS
                    )
                )
                for c in charges
            ),
            np.zeros(len(RDP_ORDERS)),
        )
        worst = np.maximum(worst, total)
    return worst


def epsilon_of_rdp(rdp: np.ndarray, delta: float) -> float:
    return float(get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)[0])


def compose(
    cfg: FederatedConfig,
    record: PrivacyRecord,
    dataset_sha256: str,
    ancestor: tuple[str, dict[str, DataPrivacy], PrivacyRecord | None] | None,
) -> tuple[dict[str, DataPrivacy], dict[str, SourceRdp]]:
    """(lineage per source, RDP per source for privacy.json) of this run and its ancestry.

    `ancestor` is (its `name:version`, its lineage's data_privacy, its privacy record if it was
    federated), or None for a run that starts from a fresh adapter.
    """
    own = data_source(dataset_sha256, cfg.data.share)
    delta, budget = cfg.privacy.delta, cfg.privacy.budget_epsilon
    inherited, inherited_rdp, versions, ancestor_record = {}, {}, [], None
    if ancestor is not None:
        ref, inherited, ancestor_record = ancestor
        inherited_rdp = ancestor_record.sources if ancestor_record else {}
        versions = [ref]
    private = record.mode != "none"
    rdp = run_rdp(record.histories) if private else None
    for source, spent in inherited.items():
        if not sources_overlap(source, own):
            continue
        earlier = inherited_rdp.get(source)
        if earlier is None and spent.epsilon is not None and ancestor_record is not None:
            earlier = SourceRdp(rdp=run_rdp(ancestor_record.histories).tolist())  # older record
        if spent.epsilon is None or earlier is None or rdp is None:
            rdp = None  # some run saw this data without DP: no guarantee left
        else:
            rdp = rdp + np.asarray(earlier.rdp)
        versions = sorted({*versions, *spent.versions})
    lineage = {s: p for s, p in inherited.items() if s != own}
    lineage[own] = DataPrivacy(
        epsilon=epsilon_of_rdp(rdp, delta) if rdp is not None else None,
        delta=delta if rdp is not None else None,
        budget_epsilon=budget,
        versions=versions,
    )
    curves = {s: c for s, c in inherited_rdp.items() if s != own}
    if rdp is not None:
        curves[own] = SourceRdp(rdp=rdp.tolist(), versions=versions)
    return lineage, curves
