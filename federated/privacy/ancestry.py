"""Epsilon across versions, per example: what a version's whole ancestry released about each
example it, or any ancestor, trained on.

Every run is a `DataUse`: the keyed ids of the examples it trained on and its RDP curve (the
worst client's, so it holds for any example of the run; None without DP). An example's privacy
loss composes, per RDP order, every use that holds it, whatever file, split or share it came
through: two shares of one file, an edited file, a resumed run all compose by content. A use
without DP that holds an example leaves it no guarantee. A data source's epsilon is the worst
over its examples. A use whose examples are not known (recorded before these records, or under
another deployment's example key) is taken to hold every example: unknown means the worst.
Examples of outside clients, which the server never sees, are one more example that no use
names, held by every use with outside clients (and every use of unknown membership).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from cluster.records.lineage import Lineage
from cluster.records.privacy_record import (
    ClientCharge,
    DataPrivacy,
    DataUse,
    DataUses,
    PrivacyRecord,
)
from federated.privacy.ledger import OUTSIDE_PREFIX

RDP_ORDERS = list(RDPAccountant.DEFAULT_ALPHAS)
_ANY_OTHER = "<an example no known use names>"  # held only by uses of unknown membership


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


def run_use(record: PrivacyRecord, source: str, key_id: str, examples: list[str]) -> DataUse:
    """This federated run's use: its RDP from the ledger's histories (None without DP)."""
    private = record.mode != "none"
    return DataUse(
        source=source,
        rdp=run_rdp(record.histories).tolist() if private else None,
        key_id=key_id,
        examples=examples,
        outside_examples=any(c.startswith(OUTSIDE_PREFIX) for c in record.histories),
    )


def ancestor_uses(
    ref: str, lineage: Lineage, record: PrivacyRecord | None, uses: DataUses | None
) -> list[DataUse]:
    """The uses an ancestor `ref` registered; for a version registered before `data_uses.json`,
    uses of unknown membership rebuilt from what it did record (its per-source RDP curves, else
    its run's histories; a source it used without DP, or nothing recorded: no DP)."""
    if uses is not None:
        return uses.of_version(ref)
    rebuilt = []
    if record is not None and record.sources:
        for source, curve in record.sources.items():
            rebuilt.append(DataUse(version=ref, source=source, rdp=curve.rdp))
    elif record is not None and record.mode != "none":
        rebuilt.append(DataUse(version=ref, source=ref, rdp=run_rdp(record.histories).tolist()))
    for source, spent in lineage.data_privacy.items():
        if spent.epsilon is None:
            rebuilt.append(DataUse(version=ref, source=source, rdp=None))
    return rebuilt or [DataUse(version=ref, source=ref, rdp=None)]


def compose(uses: Sequence[DataUse], key_id: str, delta: float) -> dict[str, DataPrivacy]:
    """Per data source (uses of one name merged), the worst per-example epsilon at `delta` over
    every use in `uses` that holds the example. See the module docstring."""
    known = [set(u.examples) if u.key_id == key_id else None for u in uses]  # None: unknown
    everyone = set().union(*(k for k in known if k is not None)) | {_ANY_OTHER}
    cache: dict[tuple[int, ...], float | None] = {}

    def holds(i: int, example: str) -> bool:
        if known[i] is None:
            return True
        return uses[i].outside_examples if example == _ANY_OTHER else example in known[i]

    def epsilon(example: str) -> tuple[float | None, tuple[int, ...]]:
        holders = tuple(i for i in range(len(uses)) if holds(i, example))
        if holders not in cache:
            curves = [uses[i].rdp for i in holders]
            cache[holders] = (
                None
                if any(c is None for c in curves)
                else epsilon_of_rdp(np.sum([np.asarray(c) for c in curves], axis=0), delta)
            )
        return cache[holders], holders

    spent: dict[str, DataPrivacy] = {}
    for source in dict.fromkeys(u.source for u in uses):
        group = [i for i, u in enumerate(uses) if u.source == source]
        members = set().union(*(everyone if known[i] is None else known[i] for i in group))
        if any(uses[i].outside_examples for i in group):
            members.add(_ANY_OTHER)
        worst: float | None = 0.0
        touching: set[int] = set()
        for example in members:
            eps, holders = epsilon(example)
            touching.update(holders)
            worst = None if worst is None or eps is None else max(worst, eps)
        private = any(uses[i].private for i in group)
        spent[source] = DataPrivacy(
            epsilon=worst if private else None,
            delta=delta if private and worst is not None else None,
            private=private,
            versions=sorted({uses[i].version for i in touching if uses[i].version}),
        )
    return spent
