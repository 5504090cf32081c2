"""The federated message format: the task the server sends and the reply a client sends back.

    server -> client  TrainTask   {"arrays": global adapter, "config": {round, attempt, ...}}
    client -> server  TrainReply  {"arrays": client adapter, "metrics": {num-examples, ...}}

Replies are parsed strictly (record names, metric keys, types and ranges): the server rejects
anything else. Under DP a reply carries nothing DP does not cover (no loss, no timing), and
aggregation weights are the server's, never the client's.

This module names every record and metric key; the server, the strategy, reply validation, the
ClientApp and the warm trainer pack and unpack messages only through these types. It imports
Flower's record types and nothing heavier: ClientApp processes must stay free of torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from federated.privacy.ledger import Attempt

ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"  # record names in a message's content

# Task config: the absolute round, this attempt at it, and every attempt of the run so far (a
# re-run round is a new attempt), each with its noise multiplier: what clients charge themselves.
ROUND, ATTEMPT = "round", "attempt"
SCHEDULE_ATTEMPTS, SCHEDULE_ROUNDS, SCHEDULE_NOISE = "attempts", "attempt-rounds", "attempt-noise"
NO_NOISE = -1.0  # the schedule's noise of an attempt without DP

NUM_EXAMPLES = "num-examples"  # the client's data size (the server sets the weights)
PARTITION_ID = "partition-id"  # also the node config key naming an in-cluster node's partition
TRAIN_LOSS = "train_loss"  # only without DP: DP does not cover a client's loss
STEPS = "steps"
TRAIN_SECONDS = "train-seconds"  # only without DP: timing is not covered either
EPSILON = "epsilon"

OUTSIDE_CLIENT = -1  # the partition id of a SuperNode that brings its own data
MAX_INT = 2**53  # integers a float64 metric holds exactly

_REQUIRED = {NUM_EXAMPLES, PARTITION_ID, STEPS}
_CLEAR_STATS = {TRAIN_LOSS, TRAIN_SECONDS}  # statistics DP does not cover


class MessageError(ValueError):
    """A message the receiver cannot accept; the text says why (the server logs it)."""


def _number(record: MetricRecord, key: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MessageError(f"metric '{key}' must be a number, got {value!r}")
    if not math.isfinite(value):
        raise MessageError(f"metric '{key}' must be finite, got {value!r}")
    return value


def _integer(record: MetricRecord, key: str, low: int, high: int = MAX_INT) -> int:
    value = _number(record, key)
    if value != int(value) or not low <= value < high:
        raise MessageError(
            f"metric '{key}' must be a whole number in [{low}, {high}), got {value!r}"
        )
    return int(value)


@dataclass(frozen=True)
class TrainTask:
    """What the server sends each sampled client: the global adapter, the absolute round, and
    every attempt of the run so far (the last one is this one) with its noise multiplier."""

    arrays: ArrayRecord
    schedule: tuple[Attempt, ...] = (Attempt(1, 1, None),)

    @property
    def current(self) -> Attempt:
        return self.schedule[-1]

    def config(self) -> ConfigRecord:
        """The task's config record (FedAvg sends it next to the arrays, adding its round)."""
        return ConfigRecord(
            {
                ROUND: self.current.round,
                ATTEMPT: self.current.attempt,
                SCHEDULE_ATTEMPTS: [a.attempt for a in self.schedule],
                SCHEDULE_ROUNDS: [a.round for a in self.schedule],
                SCHEDULE_NOISE: [NO_NOISE if a.noise is None else a.noise for a in self.schedule],
            }
        )

    def to_content(self) -> RecordDict:
        return RecordDict({ARRAYS: self.arrays, CONFIG: self.config()})

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainTask:
        if ARRAYS not in content.array_records or CONFIG not in content.config_records:
            raise MessageError(f"the task needs ArrayRecord '{ARRAYS}' and ConfigRecord '{CONFIG}'")
        config = content.config_records[CONFIG]
        try:
            columns = [
                list(config[k]) for k in (SCHEDULE_ATTEMPTS, SCHEDULE_ROUNDS, SCHEDULE_NOISE)
            ]
            schedule = tuple(
                Attempt(int(a), int(r), None if n == NO_NOISE else float(n))
                for a, r, n in zip(*columns, strict=True)
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"the task's schedule is malformed: {exc}") from None
        if not schedule or (schedule[-1].attempt, schedule[-1].round) != (
            config.get(ATTEMPT),
            config.get(ROUND),
        ):
            raise MessageError("the task's schedule does not end with its own attempt")
        return cls(content.array_records[ARRAYS], schedule)


@dataclass(frozen=True)
class TrainMetrics:
    """What a client reports with its adapter. Under DP only what DP covers: no loss, no time."""

    num_examples: int
    steps: int  # cumulative over every round this client trained in
    partition: int  # OUTSIDE_CLIENT for an outside node's own data
    train_loss: float | None = None  # without DP: mean over the round's local steps
    train_seconds: float | None = None  # without DP: model load + local steps
    epsilon: float | None = None  # local DP: the client's own ledger, at the configured delta

    def to_record(self) -> MetricRecord:
        values = {
            NUM_EXAMPLES: self.num_examples,
            PARTITION_ID: self.partition,
            STEPS: self.steps,
            TRAIN_LOSS: self.train_loss,
            TRAIN_SECONDS: self.train_seconds,
            EPSILON: self.epsilon,
        }
        return MetricRecord({k: v for k, v in values.items() if v is not None})

    @classmethod
    def from_record(cls, record: MetricRecord, private: bool = False) -> TrainMetrics:
        """Strict: the keys, types and ranges above; under DP (`private`), no clear statistics."""
        keys = set(record)
        allowed = _REQUIRED | {EPSILON} | (set() if private else _CLEAR_STATS)
        if not keys >= _REQUIRED or not keys <= allowed:
            raise MessageError(
                f"metrics must have {sorted(_REQUIRED)} and may have "
                f"{sorted(allowed - _REQUIRED)}; missing {sorted(_REQUIRED - keys)}, "
                f"unexpected {sorted(keys - allowed)}"
                + (" (DP does not cover a client's loss or timing)" if keys & _CLEAR_STATS else "")
            )
        optional = {
            k: float(_number(record, k)) for k in keys & {TRAIN_LOSS, TRAIN_SECONDS, EPSILON}
        }
        if optional.get(EPSILON, 0) < 0 or optional.get(TRAIN_SECONDS, 0) < 0:
            raise MessageError(f"'{EPSILON}' and '{TRAIN_SECONDS}' cannot be negative")
        return cls(
            num_examples=_integer(record, NUM_EXAMPLES, 1),
            steps=_integer(record, STEPS, 0),
            partition=_integer(record, PARTITION_ID, OUTSIDE_CLIENT),
            train_loss=optional.get(TRAIN_LOSS),
            train_seconds=optional.get(TRAIN_SECONDS),
            epsilon=optional.get(EPSILON),
        )


@dataclass(frozen=True)
class TrainReply:
    """A client's answer to a TrainTask: its adapter after local training, and its metrics."""

    arrays: ArrayRecord
    metrics: TrainMetrics

    def to_content(self) -> RecordDict:
        return RecordDict({ARRAYS: self.arrays, METRICS: self.metrics.to_record()})

    @classmethod
    def from_content(cls, content: RecordDict, private: bool = False) -> TrainReply:
        arrays, metrics = sorted(content.array_records), sorted(content.metric_records)
        configs = sorted(content.config_records)
        if arrays != [ARRAYS] or metrics != [METRICS] or configs:
            raise MessageError(
                f"expected only ArrayRecord '{ARRAYS}' and MetricRecord '{METRICS}', got "
                f"ArrayRecords {arrays}, MetricRecords {metrics}, ConfigRecords {configs}"
            )
        return cls(
            content.array_records[ARRAYS],
            TrainMetrics.from_record(content.metric_records[METRICS], private),
        )


def payload_bytes(content: RecordDict) -> int:
    """Bytes of tensor data a message carries: what dominates its size on the wire (the few
    config and metric values are left out). 0 for content that cannot be read."""
    try:
        return sum(len(a.data) for r in content.array_records.values() for a in r.values())
    except Exception:  # noqa: BLE001 - a hostile reply's size is not worth a crash
        return 0
