"""The server's strategy: every reply checked in its own guard, weights set by the server, every
release written to the privacy ledger before it happens, every round reported.

Flower's FedAvg only samples the nodes of a round (`configure_train`); aggregation is ours
(federated.aggregation): FedAvg weighted by the partition sizes the server planned (outside
clients: their own count, within flower.external_min/max_examples), or, under central DP, a
fixed-denominator average of clipped updates with Gaussian noise. A reply that is malformed or
hostile in any way is rejected and logged, charged to its client's privacy budget (the server
saw it), and the round goes on with the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from pydantic import BaseModel, ConfigDict

from cluster.errors import UserError
from cluster.federated_config import FederatedConfig
from federated.aggregation import Update, central_dp_average, weighted_average
from federated.ledger import (
    Attempt,
    ServerLedger,
    in_cluster_client,
    outside_client,
    sample_rate,
)
from federated.plan import FederatedPlan
from federated.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    OUTSIDE_CLIENT,
    PARTITION_ID,
    MessageError,
    TrainMetrics,
    TrainTask,
    payload_bytes,
)
from federated.validation import accepted_reply


class JoinTimeout(UserError):
    """Not enough SuperNodes joined before flower.join_timeout_s."""


class RoundReport(BaseModel):
    """One round as the server saw it: a line of the run's rounds.jsonl."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    round: int
    attempt: int = 0  # the ledger's attempt that produced this round
    clients: int
    failed: dict[int, str]  # node id -> why its reply failed (e.g. the SuperNode died)
    rejected: dict[int, str]  # node id -> why its update was refused
    train_loss: float | None  # without DP only: DP does not cover the clients' losses
    epsilon: float | None  # the worst client's after this round (the server's ledger)
    epsilons: dict[str, float] = {}  # client (partition id, or outside-<node>) -> its epsilon
    seconds: float
    slowest_client_seconds: float | None  # without DP only
    per_client: dict[int, TrainMetrics]  # node id -> what it reported, for kept replies
    bytes_sent: int = 0  # tensor bytes sent to each sampled client (the global adapter)
    bytes_received: dict[int, int] = {}  # node id -> tensor bytes of its reply (also rejected)

    @property
    def bytes_moved(self) -> int:
        """Both directions, every client of the round."""
        return self.bytes_sent * (self.clients + len(self.failed) + len(self.rejected)) + sum(
            self.bytes_received.values()
        )


class GuardedStrategy(Strategy):
    """See the module docstring. `epsilons` reads every client's epsilon off the ledger."""

    def __init__(
        self,
        cfg: FederatedConfig,
        plan: FederatedPlan,
        ledger: ServerLedger,
        epsilons: Callable[[], dict[str, float]],
        on_round: Callable[[RoundReport, ArrayRecord], None],
        round_offset: int = 0,
        rng: np.random.Generator | None = None,
    ) -> None:
        fed = cfg.federation
        self.cfg, self.plan, self.ledger = cfg, plan, ledger
        self.epsilons, self.on_round = epsilons, on_round
        self.round_offset = round_offset  # rounds saved by an earlier, interrupted run
        self.private = cfg.privacy.mode != "none"
        self.central = cfg.privacy.mode == "central_dp"
        self.sampler = FedAvg(
            fraction_train=fed.fraction_train,
            fraction_evaluate=0.0,  # held-out evaluation runs on the server, after the rounds
            min_train_nodes=fed.min_train_nodes,
            min_available_nodes=fed.min_available_nodes,
            arrayrecord_key=ARRAYS,
            configrecord_key=CONFIG,
        )
        self.rng = rng or np.random.default_rng()  # OS entropy: DP noise must not be predictable
        self.known: dict[int, str] = {}  # node id -> client, from accepted replies
        self._global = ArrayRecord()
        self._attempt = Attempt(0, 0, None)
        self._sampled: list[int] = []
        self._sent = 0  # tensor bytes of this round's task, per sampled client
        self._started = time.monotonic()

    # -- asking --------------------------------------------------------------------------------

    def _wait_for_nodes(self, grid: Grid) -> None:
        flower, needed = self.cfg.flower, self.cfg.federation.min_available_nodes
        deadline = time.monotonic() + flower.join_timeout_s
        while len(nodes := list(grid.get_node_ids())) < needed:
            if time.monotonic() > deadline:
                raise JoinTimeout(self._missing(nodes, needed))
            time.sleep(min(1.0, flower.join_timeout_s / 10))

    def _missing(self, nodes: list[int], needed: int) -> str:
        fed, flower = self.cfg.federation, self.cfg.flower
        here = {self.known[n] for n in nodes if n in self.known}
        in_cluster = [str(p) for p in range(fed.num_clients) if in_cluster_client(p) not in here]
        outside = [c for c in self.known.values() if not c.isdigit() and c not in here]
        return (
            f"{len(nodes)} of the {needed} SuperNodes a round needs "
            f"(federation.min_available_nodes) joined within flower.join_timeout_s "
            f"({flower.join_timeout_s:g} s); not known to be connected: in-cluster partitions "
            f"[{', '.join(in_cluster)}] of {fed.num_clients}, outside clients "
            f"{outside or 'none seen yet'} ({flower.external_clients} expected)"
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._wait_for_nodes(grid)
        absolute = server_round + self.round_offset
        noise = self.plan.noise.noise_multiplier if self.plan.noise else None
        # Sample first with a placeholder config, then log the attempt, then ask: no client
        # sees this round before the ledger holds it.
        messages = list(self.sampler.configure_train(absolute, arrays, ConfigRecord(), grid))
        self._sampled = [m.metadata.dst_node_id for m in messages]
        steps = self.plan.noise.steps_per_round if self.plan.noise else 0
        self._attempt = self.ledger.start(absolute, noise, steps, self._sampled)
        task = TrainTask(arrays, tuple(self.ledger.attempts()))
        for message in messages:
            message.content.config_records[CONFIG] = task.config()
        self._global, self._started = arrays, time.monotonic()
        self._sent = payload_bytes(messages[0].content) if messages else 0
        return messages

    # -- answers -------------------------------------------------------------------------------

    def _client_of(
        self, node: int, metrics: TrainMetrics, seen: set[str]
    ) -> tuple[str, float, float | None]:
        """(ledger name, aggregation weight, sampling rate) the server assigns, or MessageError."""
        flower, fed = self.cfg.flower, self.cfg.federation
        n = metrics.num_examples
        if metrics.partition == OUTSIDE_CLIENT:
            if flower.external_clients == 0:
                raise MessageError("outside clients are not expected (flower.external_clients 0)")
            if not flower.external_min_examples <= n <= flower.external_max_examples:
                raise MessageError(
                    f"an outside client claims {n} examples, outside flower.external_min_examples"
                    f"..external_max_examples ({flower.external_min_examples}.."
                    f"{flower.external_max_examples})"
                )
            name, weight = outside_client(node), float(n)
        else:
            partitions = self.plan.partitions
            if not 0 <= metrics.partition < len(partitions):
                raise MessageError(f"partition-id {metrics.partition} is not a planned partition")
            name, weight = (
                in_cluster_client(metrics.partition),
                float(len(partitions[metrics.partition])),
            )
            if n != len(partitions[metrics.partition]):
                raise MessageError(
                    f"partition {metrics.partition} has {len(partitions[metrics.partition])} "
                    f"examples, the reply claims {n}"
                )
        if name in seen:
            raise MessageError(f"a second reply for client {name} in this round")
        rate = None
        if self.plan.noise:
            rate = 1.0 if self.central else sample_rate(n, fed.batch_size)
        return name, (1.0 if self.central else weight), rate

    def _check(
        self, reply: Message, seen: set[str]
    ) -> tuple[str, float, float | None, TrainMetrics, Update]:
        parsed, update = accepted_reply(
            self._global, reply.content, self.cfg.federation.max_update_norm, self.private
        )
        name, weight, rate = self._client_of(reply.metadata.src_node_id, parsed.metrics, seen)
        return name, weight, rate, parsed.metrics, update

    def _aggregate(self, updates: list[tuple[Update, float]]) -> ArrayRecord:
        if self.central:
            return central_dp_average(
                self._global,
                [u for u, _ in updates],
                clip_norm=self.cfg.privacy.max_grad_norm,
                sigma=self.plan.noise.noise_multiplier,
                denominator=max(len(self._sampled), len(updates), 1),
                rng=self.rng,
            )
        return weighted_average(self._global, updates)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        updates, rejected, failed, per_client, seen = [], {}, {}, {}, set()
        received: dict[int, int] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if not reply.has_error():
                received[node] = payload_bytes(reply.content)
            if reply.has_error():
                failed[node] = str(reply.error.reason)[:500]
                log(WARNING, "round %d: node %d dropped out: %s", server_round, node, failed[node])
                self.ledger.reply(self._attempt, node, self.known.get(node), None, "failed")
                continue
            try:  # any exception is the reply's fault: it must never end the round
                name, weight, rate, metrics, update = self._check(reply, seen)
            except Exception as exc:  # noqa: BLE001
                why = str(exc) if isinstance(exc, MessageError) else f"malformed reply ({exc!r})"
                rejected[node] = why[:500]
                log(WARNING, "round %d: rejected reply from node %d: %s", server_round, node, why)
                claimed = self.known.get(node) or self._claimed(reply, node)
                rate = None  # an outside client's: the largest the plan allows (worst case)
                if claimed and not claimed.isdigit() and self.plan.noise:
                    rate = 1.0 if self.central else self.plan.noise.outside_rate
                self.ledger.reply(self._attempt, node, claimed, rate, "rejected")
                continue
            self.ledger.reply(self._attempt, node, name, rate, "kept")
            self.known[node], per_client[node] = name, metrics
            seen.add(name)
            updates.append((update, weight))
        arrays = self._aggregate(updates)
        epsilons = self.epsilons()
        losses = [
            (m.train_loss, m.num_examples) for m in per_client.values() if m.train_loss is not None
        ]
        times = [m.train_seconds for m in per_client.values() if m.train_seconds is not None]
        report = RoundReport(
            round=server_round,
            attempt=self._attempt.attempt,
            clients=len(updates),
            failed=failed,
            rejected=rejected,
            train_loss=(
                sum(x * n for x, n in losses) / sum(n for _, n in losses)
                if losses and not self.private
                else None
            ),
            epsilon=max(epsilons.values(), default=None),
            epsilons=epsilons,
            seconds=time.monotonic() - self._started,
            slowest_client_seconds=max(times, default=None) if not self.private else None,
            per_client=per_client,
            bytes_sent=self._sent,
            bytes_received=received,
        )
        log(
            INFO,
            "round %d: %d clients kept (%d failed, %d rejected), epsilon %s, %.1f s",
            report.round,
            report.clients,
            len(failed),
            len(rejected),
            f"{report.epsilon:.3f}" if report.epsilon is not None else "-",
            report.seconds,
        )
        self.on_round(report, arrays)
        self.ledger.done(self._attempt)  # only once the round and its line are saved
        return arrays, MetricRecord({"clients": len(updates)})

    def _claimed(self, reply: Message, node: int) -> str | None:
        """Who a rejected reply said it was, if that much can be read (to charge its budget)."""
        try:
            partition = int(reply.content.metric_records[METRICS][PARTITION_ID])
        except Exception:  # noqa: BLE001
            return None
        if partition == OUTSIDE_CLIENT:
            return outside_client(node)
        return in_cluster_client(partition) if 0 <= partition < len(self.plan.partitions) else None

    # -- no federated evaluation: held-out evaluation runs on the server after the rounds ------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> Replies checked one by one (records, keys, types, dtype/shape, finite, norm "
            "<= %s); weights set by the server; %s",
            self.cfg.federation.max_update_norm,
            "central DP (fixed denominator)" if self.central else "FedAvg",
        )
