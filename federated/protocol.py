"""The federated message format: the task the server sends and the reply a client sends back.

    server -> client  TrainTask   {"arrays": global adapter, "config": {round-offset, ...}}
    client -> server  TrainReply  {"arrays": client adapter, "metrics": {num-examples, ...}}

This module names every record and metric key; the server, the strategy, reply validation, the
ClientApp and the warm trainer pack and unpack messages only through these types. It imports
Flower's record types and nothing heavier: ClientApp processes must stay free of torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"  # record names in a message's content

ROUND_OFFSET = "round-offset"  # task config: rounds saved before this run started (resumed)

NUM_EXAMPLES = "num-examples"  # FedAvg's weight: examples behind the update
UNIT_WEIGHT = "unit-weight"  # FedAvg's weight under central DP (its noise assumes equal weights)
PARTITION_ID = "partition-id"  # also the node config key naming an in-cluster node's partition
TRAIN_LOSS = "train_loss"
STEPS = "steps"
TRAIN_SECONDS = "train-seconds"
EPSILON = "epsilon"

OUTSIDE_CLIENT = -1  # the partition id of a SuperNode that brings its own data


class MessageError(ValueError):
    """A message the receiver cannot accept; the text says why (the server logs it)."""


def _number(record: MetricRecord, key: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MessageError(f"metric '{key}' must be a number, got {value!r}")
    return value


@dataclass(frozen=True)
class TrainTask:
    """What the server sends each sampled client: the global adapter and where the run stands."""

    arrays: ArrayRecord
    round_offset: int = 0

    def config(self) -> ConfigRecord:
        """The task's config record (FedAvg sends it next to the arrays, adding its round)."""
        return ConfigRecord({ROUND_OFFSET: self.round_offset})

    def to_content(self) -> RecordDict:
        return RecordDict({ARRAYS: self.arrays, CONFIG: self.config()})

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainTask:
        if ARRAYS not in content.array_records:
            raise MessageError(f"the task has no ArrayRecord '{ARRAYS}'")
        config = content.config_records.get(CONFIG, ConfigRecord())
        return cls(content.array_records[ARRAYS], int(config.get(ROUND_OFFSET, 0)))


@dataclass(frozen=True)
class TrainMetrics:
    """What a client reports with its adapter."""

    num_examples: int
    train_loss: float  # mean over the round's local steps (NaN if DP sampling drew nobody)
    steps: int  # cumulative over every round this client trained in
    partition: int  # OUTSIDE_CLIENT for an outside node's own data
    train_seconds: float  # model load + local steps: the client's compute for the round
    epsilon: float | None = None  # local DP: after this round, at the configured delta

    def to_record(self) -> MetricRecord:
        record = MetricRecord(
            {
                NUM_EXAMPLES: self.num_examples,
                UNIT_WEIGHT: 1,
                PARTITION_ID: self.partition,
                TRAIN_LOSS: self.train_loss,
                STEPS: self.steps,
                TRAIN_SECONDS: self.train_seconds,
            }
        )
        if self.epsilon is not None:
            record[EPSILON] = self.epsilon
        return record

    @classmethod
    def from_record(cls, record: MetricRecord) -> TrainMetrics:
        examples = _number(record, NUM_EXAMPLES)
        if not math.isfinite(examples) or examples <= 0:
            raise MessageError(f"'{NUM_EXAMPLES}' must be a positive number, got {examples!r}")
        if _number(record, UNIT_WEIGHT) != 1:
            raise MessageError(f"'{UNIT_WEIGHT}' must be 1, got {record[UNIT_WEIGHT]!r}")
        return cls(
            num_examples=int(examples),
            train_loss=float(_number(record, TRAIN_LOSS)),
            steps=int(_number(record, STEPS)),
            partition=int(_number(record, PARTITION_ID)),
            train_seconds=float(_number(record, TRAIN_SECONDS)),
            epsilon=float(_number(record, EPSILON)) if EPSILON in record else None,
        )


@dataclass(frozen=True)
class TrainReply:
    """A client's answer to a TrainTask: its adapter after local training, and its metrics."""

    arrays: ArrayRecord
    metrics: TrainMetrics

    def to_content(self) -> RecordDict:
        return RecordDict({ARRAYS: self.arrays, METRICS: self.metrics.to_record()})

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainReply:
        arrays, metrics = sorted(content.array_records), sorted(content.metric_records)
        if arrays != [ARRAYS] or metrics != [METRICS]:
            raise MessageError(
                f"expected ArrayRecord '{ARRAYS}' and MetricRecord '{METRICS}', got "
                f"ArrayRecords {arrays} and MetricRecords {metrics}"
            )
        return cls(
            content.array_records[ARRAYS],
            TrainMetrics.from_record(content.metric_records[METRICS]),
        )


@dataclass(frozen=True)
class RoundMetrics:
    """A round's replies added up (what FedAvg returns for the round)."""

    num_examples: int
    train_loss: float  # per example over the kept clients
    steps: int  # the worst (largest) client's
    epsilon: float | None = None  # the worst client's (local DP)

    def to_record(self) -> MetricRecord:
        record = MetricRecord(
            {NUM_EXAMPLES: self.num_examples, TRAIN_LOSS: self.train_loss, STEPS: self.steps}
        )
        if self.epsilon is not None:
            record[EPSILON] = self.epsilon
        return record

    @classmethod
    def from_record(cls, record: MetricRecord) -> RoundMetrics:
        return cls(
            num_examples=int(record[NUM_EXAMPLES]),
            train_loss=float(record[TRAIN_LOSS]),
            steps=int(record[STEPS]),
            epsilon=float(record[EPSILON]) if EPSILON in record else None,
        )
