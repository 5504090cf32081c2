import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from federated.protocol import METRICS, NUM_EXAMPLES, MessageError, TrainMetrics, TrainReply
from federated.validation import accepted_reply


def record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


GLOBAL = record(
    {
        "a.lora_A.weight": np.zeros((4, 8), np.float32),
        "a.lora_B.weight": np.zeros((8, 4), np.float32),
    }
)


def reply(arrays: dict) -> TrainReply:
    return TrainReply(record(arrays), TrainMetrics(10, 2.0, 4, 0, 1.0))


def fine() -> dict:
    return {
        "a.lora_A.weight": np.full((4, 8), 0.01, np.float32),
        "a.lora_B.weight": np.zeros((8, 4), np.float32),
    }


def test_a_small_finite_update_is_accepted():
    assert accepted_reply(GLOBAL, reply(fine()).to_content(), max_norm=1.0) == reply(fine())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda a: a["a.lora_A.weight"].__setitem__((0, 0), np.nan), "non-finite"),
        (lambda a: a["a.lora_B.weight"].__setitem__((1, 1), np.inf), "non-finite"),
        (lambda a: a.update({"a.lora_B.weight": np.zeros((8, 5), np.float32)}), "wrong shape"),
        (lambda a: a.update({"b.lora_A.weight": a.pop("a.lora_A.weight")}), "wrong keys"),
        (lambda a: a.pop("a.lora_B.weight"), "wrong keys"),
        (lambda a: a.update({"a.lora_A.weight": np.full((4, 8), 100.0, np.float32)}), "norm"),
        (lambda a: a.update({"a.lora_A.weight": np.ones((4, 8), np.int32)}), "non-float"),
    ],
)
def test_broken_updates_are_rejected_with_a_reason(change, reason):
    arrays = fine()
    change(arrays)
    with pytest.raises(MessageError, match=reason):
        accepted_reply(GLOBAL, reply(arrays).to_content(), max_norm=1.0)


def test_a_reply_that_breaks_the_protocol_is_rejected_with_the_reason():
    content = reply(fine()).to_content()
    content.metric_records[METRICS][NUM_EXAMPLES] = 0
    with pytest.raises(MessageError, match="'num-examples' must be a positive number"):
        accepted_reply(GLOBAL, content, max_norm=1.0)
