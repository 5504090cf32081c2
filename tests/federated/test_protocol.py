"""The federated message format: round trips through Flower records, refusals, aggregation."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from federated.node_task import HISTORY_RECORD, ClientState
from federated.protocol import (
    ARRAYS,
    CONFIG,
    EPSILON,
    METRICS,
    NUM_EXAMPLES,
    STEPS,
    TRAIN_SECONDS,
    UNIT_WEIGHT,
    MessageError,
    RoundMetrics,
    TrainMetrics,
    TrainReply,
    TrainTask,
)
from federated.strategy import RoundReport, aggregate_train_metrics

ARRAYS_IN = ArrayRecord({"a.lora_A.weight": Array(np.ones((2, 3), np.float32))})


def metrics(**changes) -> TrainMetrics:
    values = dict(num_examples=10, train_loss=2.0, steps=4, partition=1, train_seconds=3.5)
    return TrainMetrics(**{**values, **changes})


def test_a_task_round_trips_and_carries_the_round_offset():
    task = TrainTask(ARRAYS_IN, round_offset=3)
    content = task.to_content()
    assert set(content) == {ARRAYS, CONFIG}
    content.config_records[CONFIG]["server-round"] = 1  # what FedAvg adds
    assert TrainTask.from_content(content) == task
    assert TrainTask.from_content(RecordDict({ARRAYS: ARRAYS_IN})).round_offset == 0


@pytest.mark.parametrize("epsilon", [None, 1.25])
def test_a_reply_round_trips(epsilon):
    reply = TrainReply(ARRAYS_IN, metrics(epsilon=epsilon))
    content = reply.to_content()
    assert content.metric_records[METRICS][UNIT_WEIGHT] == 1
    assert TrainReply.from_content(content) == reply


def _content(record: dict, arrays: str = ARRAYS, metrics_name: str = METRICS) -> RecordDict:
    return RecordDict({arrays: ARRAYS_IN, metrics_name: MetricRecord(record)})


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({NUM_EXAMPLES: 0}, "'num-examples' must be a positive number"),
        ({NUM_EXAMPLES: math.inf}, "'num-examples' must be a positive number"),
        ({UNIT_WEIGHT: 50}, "'unit-weight' must be 1"),  # would outweigh the others
        ({STEPS: [1, 2]}, "metric 'steps' must be a number"),
    ],
)
def test_replies_with_bad_metrics_are_refused_with_the_reason(change, reason):
    record = dict(metrics().to_record())
    with pytest.raises(MessageError, match=reason):
        TrainReply.from_content(_content({**record, **change}))


def test_replies_with_other_records_are_refused():
    record = dict(metrics().to_record())
    with pytest.raises(MessageError, match="expected ArrayRecord 'arrays' and MetricRecord"):
        TrainReply.from_content(_content(record, arrays="weights"))
    missing = {k: v for k, v in record.items() if k != TRAIN_SECONDS}
    with pytest.raises(MessageError, match="metric 'train-seconds' must be a number, got None"):
        TrainReply.from_content(_content(missing))


def test_round_metrics_weigh_the_loss_by_examples_and_keep_the_worst_privacy():
    replies = [
        TrainReply(ARRAYS_IN, metrics(num_examples=30, train_loss=1.0, steps=4, epsilon=0.5)),
        TrainReply(ARRAYS_IN, metrics(num_examples=10, train_loss=3.0, steps=6, epsilon=0.9)),
    ]
    record = aggregate_train_metrics([r.to_content() for r in replies], UNIT_WEIGHT)
    assert RoundMetrics.from_record(record) == RoundMetrics(40, 1.5, 6, 0.9)


def test_round_metrics_without_local_dp_have_no_epsilon():
    replies = [TrainReply(ARRAYS_IN, metrics()), TrainReply(ARRAYS_IN, metrics(partition=0))]
    record = aggregate_train_metrics([r.to_content() for r in replies], NUM_EXAMPLES)
    assert EPSILON not in record
    assert RoundMetrics.from_record(record) == RoundMetrics(20, 2.0, 4)


def test_client_state_survives_the_context_state_between_messages():
    state = RecordDict()
    assert ClientState.load(state) == ClientState(0, None)  # a fresh (or resumed) node

    ClientState(steps=4, history=[(1.1, 0.09, 2), (1.1, 0.09, 2)]).save(state)
    assert ClientState.load(state) == ClientState(4, [(1.1, 0.09, 2), (1.1, 0.09, 2)])
    assert isinstance(state[HISTORY_RECORD], ConfigRecord)

    without_dp = RecordDict()
    ClientState(steps=2, history=[]).save(without_dp)
    assert ClientState.load(without_dp) == ClientState(2, None)


def test_a_round_report_round_trips_through_its_log_line_even_with_a_nan_loss():
    report = RoundReport(
        round=2,
        clients=1,
        failed={7: "node lost"},
        rejected={9: "non-finite values"},
        train_loss=None,
        epsilon=0.4,
        seconds=12.5,
        slowest_client_seconds=3.5,
        per_client={5: metrics(train_loss=float("nan"), epsilon=0.4)},
    )
    back = RoundReport.model_validate_json(report.model_dump_json())
    assert math.isnan(back.per_client[5].train_loss)
    assert back.model_copy(update={"per_client": {}}) == report.model_copy(
        update={"per_client": {}}
    )
