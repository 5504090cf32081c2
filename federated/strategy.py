"""The server's strategy: FedAvg of the protocol's replies, and a wrapper that drops invalid
replies before aggregation and reports every round.

The wrapper is outermost (around FedAvg, or FedAvg inside Flower's central-DP wrapper), because
the DP wrapper clips replies against the global adapter and would fail on a wrong shape first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy
from pydantic import BaseModel, ConfigDict

from cluster.federated_config import FederatedConfig
from federated.plan import NoisePlan
from federated.protocol import (
    ARRAYS,
    CONFIG,
    NUM_EXAMPLES,
    UNIT_WEIGHT,
    MessageError,
    RoundMetrics,
    TrainMetrics,
    TrainReply,
)
from federated.validation import accepted_reply


class RoundReport(BaseModel):
    """One round as the server saw it: a line of the run's rounds.jsonl."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    round: int
    clients: int
    failed: dict[int, str]  # node id -> why its reply failed (e.g. the SuperNode died)
    rejected: dict[int, str]  # node id -> why its update was refused
    train_loss: float | None
    epsilon: float | None
    seconds: float
    slowest_client_seconds: float | None
    per_client: dict[int, TrainMetrics]  # node id -> what it reported, for kept replies


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Loss weighted by examples; epsilon and steps of the worst client (privacy is per client).

    `weight_key` (Flower's signature) is ignored: under central DP FedAvg weighs clients
    uniformly, but the loss is still best averaged per example.
    """
    clients = [TrainReply.from_content(r).metrics for r in records]
    examples = sum(c.num_examples for c in clients)
    epsilons = [c.epsilon for c in clients if c.epsilon is not None]
    return RoundMetrics(
        num_examples=examples,
        train_loss=sum(c.train_loss * c.num_examples for c in clients) / examples,
        steps=max(c.steps for c in clients),
        epsilon=max(epsilons, default=None),
    ).to_record()


def build_strategy(cfg: FederatedConfig, noise: NoisePlan | None) -> Strategy:
    """FedAvg over the protocol's records, inside Flower's central-DP wrapper for central_dp."""
    fed = cfg.federation
    central = cfg.privacy.mode == "central_dp"
    fedavg = FedAvg(
        fraction_train=fed.fraction_train,
        fraction_evaluate=0.0,  # held-out evaluation runs on the server, after the rounds
        min_train_nodes=fed.min_train_nodes,
        min_available_nodes=fed.min_available_nodes,
        weighted_by_key=UNIT_WEIGHT if central else NUM_EXAMPLES,
        arrayrecord_key=ARRAYS,
        configrecord_key=CONFIG,
        train_metrics_aggr_fn=aggregate_train_metrics,
    )
    if not central:
        return fedavg
    return DifferentialPrivacyServerSideFixedClipping(
        fedavg,
        noise_multiplier=noise.noise_multiplier,
        clipping_norm=cfg.privacy.max_grad_norm,
        num_sampled_clients=cfg.sampled_clients(),
    )


class GuardedStrategy(Strategy):
    def __init__(
        self,
        inner: Strategy,
        max_update_norm: float,
        epsilon_at: Callable[[int, RoundMetrics | None], float | None],
        on_round: Callable[[RoundReport, ArrayRecord | None], None],
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
        kept, rejected, failed, per_client = [], {}, {}, {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                failed[node] = reply.error.reason
                log(WARNING, "round %d: node %d dropped out: %s", server_round, node, failed[node])
                kept.append(reply)  # the inner strategy decides what a failure means
                continue
            try:
                per_client[node] = accepted_reply(
                    self._global, reply.content, self.max_update_norm
                ).metrics
            except MessageError as exc:
                log(WARNING, "round %d: rejected update from node %d: %s", server_round, node, exc)
                rejected[node] = str(exc)
                continue
            kept.append(reply)
        arrays, metrics = self.inner.aggregate_train(server_round, kept)
        totals = RoundMetrics.from_record(metrics) if metrics else None
        report = RoundReport(
            round=server_round,
            clients=len(kept) - len(failed),
            failed=failed,
            rejected=rejected,
            train_loss=totals.train_loss if totals else None,
            epsilon=self.epsilon_at(server_round, totals),
            seconds=time.monotonic() - self._started,
            slowest_client_seconds=max(
                (c.train_seconds for c in per_client.values()), default=None
            ),
            per_client=per_client,
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
        self.on_round(report, arrays)
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
