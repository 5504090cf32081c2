from collections import Counter

import pytest

from cluster.core.federated_config import PartitionSettings
from federated.partition import PartitionError, partition_indices
from llm.data import Example

LABELS = ["GATE", "LEDGER", "DOCK", "FORGE"]


def examples(n: int = 200) -> list[Example]:
    return [
        Example([{"role": "user", "content": f"q{i}"}], "a", {"team": LABELS[i % 4]})
        for i in range(n)
    ]


def label_shares(data, parts):
    return [Counter(data[i].meta["team"] for i in part) for part in parts]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "by_label"])
def test_partition_is_deterministic_and_complete(scheme):
    data, settings = examples(), PartitionSettings(scheme=scheme, alpha=0.5)
    parts = partition_indices(data, 3, settings)
    assert parts == partition_indices(data, 3, settings)
    assert sorted(i for part in parts for i in part) == list(range(len(data)))
    if scheme != "by_label":  # by_label has no randomness to reseed
        assert parts != partition_indices(data, 3, settings.model_copy(update={"seed": 1}))


def test_non_iid_partitions_are_skewed_by_team_and_iid_ones_are_not():
    data = examples(400)
    iid = label_shares(data, partition_indices(data, 3, PartitionSettings(scheme="iid")))
    skewed = label_shares(
        data, partition_indices(data, 3, PartitionSettings(scheme="dirichlet", alpha=0.3))
    )
    by_label = label_shares(data, partition_indices(data, 2, PartitionSettings(scheme="by_label")))

    def top_share(counts):
        return max(c.most_common(1)[0][1] / sum(c.values()) for c in counts)

    assert top_share(iid) < 0.4  # each team is about a quarter everywhere
    assert top_share(skewed) > 0.5
    assert set(by_label[0]).isdisjoint(by_label[1])


def test_impossible_partitions_say_why():
    with pytest.raises(PartitionError, match="at least one 'team' value per client"):
        partition_indices(examples(), 5, PartitionSettings(scheme="by_label"))
    with pytest.raises(PartitionError, match="no 'shop' metadata"):
        partition_indices(examples(), 2, PartitionSettings(scheme="dirichlet", key="shop"))
