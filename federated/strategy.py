"""A strategy wrapper that drops invalid replies before aggregation and reports every round.

It wraps the outermost strategy (FedAvg, or FedAvg inside Flower's central-DP wrapper), because
the DP wrapper clips replies against the global adapter and would fail on a wrong shape first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from federated.validation import WEIGHT_KEY, update_problem


@dataclass(frozen=True)
class RoundReport:
    round: int
    clients: int
    failed: dict[int, str]  # node id -> why its reply failed (e.g. the SuperNode died)
    rejected: dict[int, str]  # node id -> why its update was refused
    train_loss: float | None
    epsilon: float | None
    seconds: float
    slowest_client_seconds: float | None
    per_client: list[dict] = field(default_factory=list)  # partition, epsilon, steps, loss, s
    arrays: ArrayRecord | None = field(default=None, repr=False)


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Loss weighted by examples; epsilon and steps of the worst client (privacy is per client).

    `weight_key` (Flower's signature) is ignored: under central DP FedAvg weighs clients
    uniformly, but the loss is still best averaged per example.
    """
    metrics = [next(iter(r.metric_records.values())) for r in records]
    examples = [float(m[WEIGHT_KEY]) for m in metrics]
    weighted = sum(float(m["train_loss"]) * n for m, n in zip(metrics, examples, strict=True))
    out = MetricRecord({WEIGHT_KEY: int(sum(examples)), "train_loss": weighted / sum(examples)})
    for key in ("epsilon", "steps"):
        if key in metrics[0]:
            out[key] = max(m[key] for m in metrics)
    return out


def _client_summary(node: int, content: RecordDict) -> dict:
    metrics = next(iter(content.metric_records.values()))  # validated: exactly one
    return {
        "node": node,
        "partition": int(metrics.get("partition-id", -1)),
        "train_loss": float(metrics.get("train_loss", float("nan"))),
        "steps": int(metrics.get("steps", 0)),
        "epsilon": float(metrics["epsilon"]) if "epsilon" in metrics else None,
        "train_seconds": float(metrics.get("train-seconds", 0.0)),
    }


class GuardedStrategy(Strategy):
    def __init__(
        self,
        inner: Strategy,
        max_update_norm: float,
        epsilon_at: Callable[[int, MetricRecord | None], float | None],
        on_round: Callable[[RoundReport], None],
        round_offset: int = 0,
    ) -> None:
        self.inner = inner
        self.round_offset = round_offset  # rounds saved by an earlier, interrupted run
        self.max_update_norm = max_update_norm
        self.epsilon_at = epsilon_at
        self.on_round = on_round
        self._global = ArrayRecord()
        self._started = time.monotonic()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global, self._started = arrays, time.monotonic()
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        kept, rejected, failed, per_client = [], {}, {}, []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                failed[node] = reply.error.reason
                log(WARNING, "round %d: node %d dropped out: %s", server_round, node, failed[node])
                kept.append(reply)  # the inner strategy decides what a failure means
                continue
            problem = update_problem(self._global, reply.content, self.max_update_norm)
            if problem:
                log(
                    WARNING,
                    "round %d: rejected update from node %d: %s",
                    server_round,
                    node,
                    problem,
                )
                rejected[node] = problem
            else:
                kept.append(reply)
                per_client.append(_client_summary(node, reply.content))
        arrays, metrics = self.inner.aggregate_train(server_round, kept)
        report = RoundReport(
            round=server_round,
            clients=len(kept) - len(failed),
            failed=failed,
            rejected=rejected,
            train_loss=float(metrics["train_loss"]) if metrics else None,
            epsilon=self.epsilon_at(server_round, metrics),
            seconds=time.monotonic() - self._started,
            slowest_client_seconds=max((c["train_seconds"] for c in per_client), default=None),
            per_client=per_client,
            arrays=arrays,
        )
        log(
            INFO,
            "round %d: %d clients (%d failed, %d rejected), train loss %s, epsilon %s, %.1f s",
            report.round,
            report.clients,
            len(failed),
            len(rejected),
            f"{report.train_loss:.4f}" if report.train_loss is not None else "-",
            f"{report.epsilon:.3f}" if report.epsilon is not None else "-",
            report.seconds,
        )
        self.on_round(report)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log(
            INFO, "\t├──> Replies validated: keys, shapes, finite, norm <= %s", self.max_update_norm
        )
        self.inner.summary()
