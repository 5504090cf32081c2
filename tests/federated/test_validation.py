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
    return TrainReply(record(arrays), TrainMetrics(num_examples=10, steps=4, partition=0))


def fine() -> dict:
    return {
        "a.lora_A.weight": np.full((4, 8), 0.01, np.float32),
        "a.lora_B.weight": np.zeros((8, 4), np.float32),
    }


def test_a_small_finite_update_is_accepted_with_its_update():
    parsed, update = accepted_reply(GLOBAL, reply(fine()).to_content(), max_norm=1.0)
    assert parsed == reply(fine())
    assert np.allclose(update["a.lora_A.weight"], 0.01) and not update["a.lora_B.weight"].any()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda a: a["a.lora_A.weight"].__setitem__((0, 0), np.nan), "non-finite"),
        (lambda a: a["a.lora_B.weight"].__setitem__((1, 1), np.inf), "non-finite"),
        (lambda a: a.update({"a.lora_B.weight": np.zeros((8, 5), np.float32)}), "wrong shape"),
        (lambda a: a.update({"b.lora_A.weight": a.pop("a.lora_A.weight")}), "wrong keys"),
        (lambda a: a.pop("a.lora_B.weight"), "wrong keys"),
        (lambda a: a.update({"a.lora_A.weight": np.full((4, 8), 100.0, np.float32)}), "norm"),
        (lambda a: a.update({"a.lora_A.weight": np.ones((4, 8), np.int32)}), "wrong dtype"),
        (lambda a: a.update({"a.lora_A.weight": np.ones((4, 8), np.float64)}), "wrong dtype"),
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
    with pytest.raises(MessageError, match="'num-examples' must be a whole number"):
        accepted_reply(GLOBAL, content, max_norm=1.0)


def test_an_array_whose_bytes_do_not_match_its_declared_shape_is_refused_unread():
    content = reply(fine()).to_content()
    declared = content.array_records["arrays"]["a.lora_A.weight"]
    declared.data = declared.data + b"\0" * 10_000  # a payload far larger than (4, 8) float32
    with pytest.raises(MessageError, match="holds .* bytes, not a float32 array"):
        accepted_reply(GLOBAL, content, max_norm=1.0)
    garbage = reply(fine()).to_content()
    array = garbage.array_records["arrays"]["a.lora_B.weight"]
    array.data = b"x" * len(array.data)  # the right size, but not an .npy payload
    with pytest.raises(MessageError, match="cannot be read as an array"):
        accepted_reply(GLOBAL, garbage, max_norm=1.0)


SECRET = "patient 7 diagnosis"  # what a client's own text could quote


def _npy_quoting(text: str) -> bytes:
    """A (4, 8) float32 payload whose .npy header numpy quotes back in its error."""
    header = f"{{'descr': '{text}', 'fortran_order': False, 'shape': (4, 8), }}".encode()
    header = header.ljust(118) + b"\n"
    payload = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header
    return payload.ljust(4 * 8 * 4 + 128, b"\0")


@pytest.mark.parametrize(
    "change",
    [
        lambda a: setattr(a["a.lora_A.weight"], "dtype", SECRET),  # a dtype string of its own
        lambda a: a.__setitem__(SECRET, a["a.lora_A.weight"]),  # a key of its own
        lambda a: setattr(a["a.lora_B.weight"], "data", _npy_quoting(SECRET)),
    ],
)
def test_a_rejection_reason_never_quotes_text_the_client_chose(change):
    content = reply(fine()).to_content()
    change(content.array_records["arrays"])
    with pytest.raises(MessageError) as refused:
        accepted_reply(GLOBAL, content, max_norm=1.0)
    assert SECRET not in str(refused.value)
