import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from federated.validation import update_problem


def record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


GLOBAL = record(
    {
        "a.lora_A.weight": np.zeros((4, 8), np.float32),
        "a.lora_B.weight": np.zeros((8, 4), np.float32),
    }
)


def reply(arrays: dict, examples: int = 10) -> RecordDict:
    return RecordDict(
        {"arrays": record(arrays), "metrics": MetricRecord({"num-examples": examples})}
    )


def fine() -> dict:
    return {
        "a.lora_A.weight": np.full((4, 8), 0.01, np.float32),
        "a.lora_B.weight": np.zeros((8, 4), np.float32),
    }


def test_a_small_finite_update_is_accepted():
    assert update_problem(GLOBAL, reply(fine()), max_norm=1.0) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda a: a["a.lora_A.weight"].__setitem__((0, 0), np.nan), "non-finite"),
        (lambda a: a["a.lora_B.weight"].__setitem__((1, 1), np.inf), "non-finite"),
        (lambda a: a.update({"a.lora_B.weight": np.zeros((8, 5), np.float32)}), "wrong shape"),
        (lambda a: a.update({"b.lora_A.weight": a.pop("a.lora_A.weight")}), "wrong keys"),
        (lambda a: a.pop("a.lora_B.weight"), "wrong keys"),
        (lambda a: a.update({"a.lora_A.weight": np.full((4, 8), 100.0, np.float32)}), "norm"),
    ],
)
def test_broken_updates_are_rejected_with_a_reason(change, reason):
    arrays = fine()
    change(arrays)
    assert reason in update_problem(GLOBAL, reply(arrays), max_norm=1.0)


def test_a_reply_without_a_positive_weight_is_rejected():
    assert "num-examples" in update_problem(GLOBAL, reply(fine(), examples=0), max_norm=1.0)
