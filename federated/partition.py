"""Split the training examples across clients: IID, or skewed by a metadata label.

Deterministic: the input order comes from `split_examples` (ranked by content hash) and every
random draw comes from a generator seeded by `partition.seed`. The job partitions once, when it
starts (federated.planning); nodes receive their indices with the plan and only look them up.
"""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np

from cluster.core.config import DataSettings
from cluster.core.errors import UserError
from cluster.core.federated_config import PartitionSettings
from federated.plan import FederatedPlan
from llm.data import Example, load_split

MAX_DIRICHLET_DRAWS = 100


class PartitionError(UserError):
    """The examples cannot be split as configured. The message is meant for users."""


def _by_label(examples: list[Example], key: str) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, example in enumerate(examples):
        if key not in example.meta:
            raise PartitionError(f"example {i} has no '{key}' metadata to partition by")
        groups[str(example.meta[key])].append(i)
    return dict(sorted(groups.items()))


def _iid(n: int, clients: int, rng: random.Random) -> list[list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    return [order[c::clients] for c in range(clients)]


def _dirichlet(
    groups: dict[str, list[int]], clients: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(clients)]
    for indices in groups.values():
        shuffled = [indices[i] for i in rng.permutation(len(indices))]
        shares = rng.dirichlet([alpha] * clients)
        cuts = (np.cumsum(shares)[:-1] * len(shuffled)).astype(int)
        for part, chunk in zip(parts, np.split(np.array(shuffled), cuts), strict=True):
            part.extend(int(i) for i in chunk)
    return parts


def partition_indices(
    examples: list[Example], clients: int, settings: PartitionSettings
) -> list[list[int]]:
    """Indices of `examples` for each client; every example goes to exactly one client."""
    if settings.scheme == "iid":
        parts = _iid(len(examples), clients, random.Random(settings.seed))
    elif settings.scheme == "by_label":
        labels = list(_by_label(examples, settings.key).values())
        if len(labels) < clients:
            raise PartitionError(
                f"'by_label' needs at least one '{settings.key}' value per client: "
                f"{len(labels)} values for {clients} clients"
            )
        parts = [[i for group in labels[c::clients] for i in group] for c in range(clients)]
    else:
        groups = _by_label(examples, settings.key)
        rng = np.random.default_rng(settings.seed)
        for _ in range(MAX_DIRICHLET_DRAWS):  # small alpha can leave a client (almost) empty
            parts = _dirichlet(groups, clients, settings.alpha, rng)
            if min(len(p) for p in parts) >= settings.min_examples:
                break
        else:
            raise PartitionError(
                f"no Dirichlet(alpha={settings.alpha}) draw in {MAX_DIRICHLET_DRAWS} gave every "
                f"client {settings.min_examples} examples: raise alpha or lower min_examples"
            )
    if min(len(p) for p in parts) < settings.min_examples:
        raise PartitionError(
            f"a client would get {min(len(p) for p in parts)} examples, fewer than "
            f"partition.min_examples ({settings.min_examples})"
        )
    return [sorted(p) for p in parts]


def client_examples(data: DataSettings, plan: FederatedPlan, partition: int) -> list[Example]:
    """An in-cluster client's examples: its planned indices into the clients' share of `data`."""
    if not 0 <= partition < len(plan.partitions):
        raise PartitionError(f"partition-id {partition} is outside 0..{len(plan.partitions) - 1}")
    pool = load_split(data).train
    if len(pool) != plan.pool_size:
        raise PartitionError(
            f"{data.path} gives this node {len(pool)} examples to share, the plan "
            f"{plan.pool_size}: every in-cluster node needs the job's dataset"
        )
    return [pool[i] for i in plan.partitions[partition]]
