"""The federated message format: round trips through Flower records, refusals, client state."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from federated.node_task import LEDGER_RECORD, ClientState
from federated.privacy.ledger import Attempt, Charge
from federated.protocol import (
    ARRAYS,
    CONFIG,
    EPSILON,
    METRICS,
    NUM_EXAMPLES,
    STEPS,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    MessageError,
    TrainMetrics,
    TrainReply,
    TrainTask,
)
from federated.strategy import RoundReport

ARRAYS_IN = ArrayRecord({"a.lora_A.weight": Array(np.ones((2, 3), np.float32))})


def metrics(**changes) -> TrainMetrics:
    values = dict(num_examples=10, steps=4, partition=1)
    return TrainMetrics(**{**values, **changes})


def test_a_task_round_trips_with_its_schedule_of_attempts():
    schedule = (Attempt(1, 1, 1.1), Attempt(2, 2, 1.1), Attempt(3, 2, 1.3))  # round 2 re-run
    task = TrainTask(ARRAYS_IN, schedule)
    content = task.to_content()
    assert set(content) == {ARRAYS, CONFIG}
    content.config_records[CONFIG]["server-round"] = 1  # what FedAvg adds
    back = TrainTask.from_content(content)
    assert back == task and back.current == Attempt(3, 2, 1.3)
    without_dp = TrainTask(ARRAYS_IN, (Attempt(1, 1, None),))
    assert TrainTask.from_content(without_dp.to_content()) == without_dp


@pytest.mark.parametrize("private", [False, True])
def test_a_reply_round_trips_and_under_dp_carries_no_loss_or_timing(private):
    clear = {} if private else {"train_loss": 2.0, "train_seconds": 3.5}
    reply = TrainReply(ARRAYS_IN, metrics(epsilon=1.25, **clear))
    content = reply.to_content()
    assert TrainReply.from_content(content, private) == reply
    assert (TRAIN_LOSS in content.metric_records[METRICS]) is not private


def _content(record: dict, arrays: str = ARRAYS, metrics_name: str = METRICS) -> RecordDict:
    return RecordDict({arrays: ARRAYS_IN, metrics_name: MetricRecord(record)})


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({NUM_EXAMPLES: 0}, "'num-examples' must be a whole number"),
        ({NUM_EXAMPLES: math.inf}, "'num-examples' must be finite"),
        ({NUM_EXAMPLES: 9e18}, "'num-examples' must be a whole number in"),
        ({STEPS: [1, 2]}, "metric 'steps' must be a number"),
        ({STEPS: math.nan}, "metric 'steps' must be finite"),
        ({STEPS: 2.5}, "'steps' must be a whole number"),
        ({"unit-weight": -1.0}, "unexpected \\['unit-weight'\\]"),
        ({EPSILON: -0.5}, "cannot be negative"),
        ({EPSILON: math.nan}, "'epsilon' must be finite"),
    ],
)
def test_replies_with_bad_metrics_are_refused_with_the_reason(change, reason):
    record = dict(metrics().to_record())
    with pytest.raises(MessageError, match=reason):
        TrainReply.from_content(_content({**record, **change}))


def test_replies_with_other_or_missing_records_or_keys_are_refused():
    record = dict(metrics().to_record())
    with pytest.raises(MessageError, match="expected only ArrayRecord 'arrays' and MetricRecord"):
        TrainReply.from_content(_content(record, arrays="weights"))
    extra = _content(record)
    extra["config"] = ConfigRecord({"x": 1})
    with pytest.raises(MessageError, match="ConfigRecords \\['config'\\]"):
        TrainReply.from_content(extra)
    missing = {k: v for k, v in record.items() if k != STEPS}
    with pytest.raises(MessageError, match="missing \\['steps'\\]"):
        TrainReply.from_content(_content(missing))


def test_under_dp_a_reply_with_a_loss_or_timing_in_clear_is_refused():
    record = dict(metrics(train_loss=2.0, train_seconds=1.0).to_record())
    assert TrainReply.from_content(_content(record), private=False)
    with pytest.raises(MessageError, match="DP does not cover a client's loss or timing"):
        TrainReply.from_content(_content(record), private=True)
    assert TRAIN_SECONDS in record


def test_client_state_keeps_the_client_ledger_between_messages():
    state = RecordDict()
    assert ClientState.load(state) == ClientState(0, ())  # a fresh (or restarted) node

    ledger = (Charge(1, 1, 1.1, 0.09, 2, True), Charge(2, 2, 1.1, 0.09, 2))
    ClientState(steps=4, ledger=ledger).save(state)
    assert ClientState.load(state) == ClientState(4, ledger)
    assert isinstance(state[LEDGER_RECORD], ConfigRecord)

    without_dp = RecordDict()
    ClientState(steps=2).save(without_dp)
    assert ClientState.load(without_dp) == ClientState(2, ())


def test_a_round_report_round_trips_through_its_log_line():
    report = RoundReport(
        round=2,
        attempt=3,
        clients=1,
        failed={7: "node lost"},
        rejected={9: "non-finite values"},
        train_loss=None,
        epsilon=0.4,
        epsilons={"0": 0.4, "outside-9": 0.2},
        seconds=12.5,
        slowest_client_seconds=None,
        per_client={5: metrics(epsilon=0.4)},
    )
    assert RoundReport.model_validate_json(report.model_dump_json()) == report
