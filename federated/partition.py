"""Split the training examples across clients: IID, or skewed by a metadata label.

Deterministic: the input order comes from `split_examples` (ranked by content hash) and every
random draw comes from a generator seeded by `partition.seed`, so every process (server, each
SuperNode) computes the same partitions without exchanging data.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np

from cluster.errors import UserError
from llm.data import Example, load_split

if TYPE_CHECKING:
    from federated.config import FederatedConfig, PartitionSettings

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


def client_partitions(cfg: FederatedConfig) -> list[list[Example]]:
    """The configured share of the training split, partitioned over the configured clients."""
    split = load_split(cfg.data)
    parts = partition_indices(split.train, cfg.federation.num_clients, cfg.partition)
    return [[split.train[i] for i in part] for part in parts]
