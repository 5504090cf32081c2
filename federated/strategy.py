"""The server's strategy: every reply checked in its own guard, weights set by the server, every
release written to the privacy ledger before it happens, every round reported.

Flower's FedAvg only samples the nodes of a round (`configure_train`); aggregation is ours
(federated.aggregation): FedAvg weighted by the partition sizes the server planned (outside
clients: their own count, within flower.external_min/max_examples, and never above the largest
in-cluster partition), or equal weights (flower.aggregation_weights), or, under central DP, a
fixed-denominator average of clipped updates with Gaussian noise. A reply that is malformed or
hostile in any way is rejected and logged, charged to its client's privacy budget (the server
saw it), and the round goes on with the rest.

Clients are bound to who they are: an in-cluster partition to the Flower node that first
answered for it (a second node claiming it is rejected while that node is connected; a
restarted SuperNode, with a new node id, takes it over once the old one left), and a node to
the client it answered as. Bindings are read back from the ledger's kept replies on resume.
What a client's error said is never kept, only its class: a ClientApp's message can quote its
training data.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from pydantic import BaseModel, ConfigDict

from cluster.core.errors import UserError
from cluster.core.federated_config import FederatedConfig
from federated.aggregation import Update, central_dp_average, weighted_average
from federated.plan import FederatedPlan
from federated.privacy.ledger import (
    Attempt,
    ServerLedger,
    in_cluster_client,
    outside_client,
    sample_rate,
)
from federated.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
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


_ERROR_NAMES = {
    code: name.lower().replace("_", " ") for name, code in vars(ErrorCode).items() if name.isupper()
}
_RAISED = re.compile(r"<class '([\w.]{1,100})'>")  # Flower's reason: "<class 'X'>:<'message'>"
_CLASS_NAME = re.compile(r"[A-Za-z_][\w.]{0,99}")  # fedforge's ClientApp sends only this


def failure_of(error: Error) -> str:
    """Why a reply failed, without the client's own words: Flower's error code and its name,
    and the class of the exception, if named."""
    what = f"Flower error {error.code} ({_ERROR_NAMES.get(error.code, 'unknown code')})"
    reason = str(error.reason)
    raised = _RAISED.match(reason)
    name = raised[1] if raised else reason if _CLASS_NAME.fullmatch(reason) else None
    return f"{what}: {name}" if name else what


def _rejection(exc: Exception) -> str:
    """Why a reply was rejected: the server's own words (MessageError), else only the class of
    what went wrong (an exception's text could quote the client's data)."""
    return str(exc) if isinstance(exc, MessageError) else f"malformed reply ({type(exc).__name__})"


def _claimed_number(reply: Message, key: str) -> float | None:
    """A finite number a rejected reply's metrics give for `key`, if they can be read."""
    try:
        value = reply.content.metric_records[METRICS][key]
    except Exception:  # noqa: BLE001 - a hostile reply's structure is not worth a crash
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


class RoundReport(BaseModel):
    """One round as the server saw it: a line of the run's rounds.jsonl."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    round: int
    attempt: int = 0  # the ledger's attempt that produced this round
    clients: int
    failed: dict[int, str]  # node id -> Flower's error code and class (never the client's text)
    rejected: dict[int, str]  # node id -> why its update was refused (the server's words)
    train_loss: float | None  # without DP only: DP does not cover the clients' losses
    epsilon: float | None  # the worst client's after this round (the server's ledger)
    epsilons: dict[str, float] = {}  # client (partition id, or outside-<node>) -> its epsilon
    # Without DP only: a round's time follows the examples its clients sampled (DP does not
    # cover it), so under DP it is not written down or printed.
    seconds: float | None
    slowest_client_seconds: float | None
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
        self.bound = ledger.bindings()  # client -> node id, from kept replies (resumes keep them)
        self.known = {node: client for client, node in self.bound.items()}  # node id -> client
        self._grid: Grid | None = None
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
        self._grid = grid  # who is still connected, when a node claims a bound partition
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

    def _check_identity(self, node: int, name: str, connected: set[int]) -> None:
        """A node answers as one client, and a client from its bound node while that node is
        connected (a SuperNode restarted by Ray has a new node id; its old one left)."""
        if self.known.get(node, name) != name:
            raise MessageError(f"node {node} answered as client {self.known[node]}, not {name}")
        holder = self.bound.get(name, node)
        if holder != node and holder in connected:
            raise MessageError(
                f"client {name} is bound to node {holder}, which is still connected; node "
                f"{node} cannot answer for it"
            )

    def _bind(self, node: int, name: str) -> None:
        if (holder := self.bound.get(name, node)) != node:
            log(INFO, "client %s moved from node %d (gone) to node %d", name, holder, node)
        self.bound[name], self.known[node] = node, name

    def _client_of(
        self, node: int, metrics: TrainMetrics, seen: set[str], connected: set[int]
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
            # What the server knows caps what it is told: no more than any in-cluster client.
            largest = max(len(p) for p in self.plan.partitions)
            name, weight = outside_client(node), float(min(n, largest))
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
        self._check_identity(node, name, connected)
        if name in seen:
            raise MessageError(f"a second reply for client {name} in this round")
        rate = None
        if self.plan.noise:
            rate = 1.0 if self.central else sample_rate(n, fed.batch_size)
        equal = self.central or flower.aggregation_weights == "equal"
        return name, (1.0 if equal else weight), rate

    def _check(
        self, reply: Message, seen: set[str], connected: set[int]
    ) -> tuple[str, float, float | None, TrainMetrics, Update]:
        parsed, update = accepted_reply(
            self._global, reply.content, self.cfg.federation.max_update_norm, self.private
        )
        node = reply.metadata.src_node_id
        name, weight, rate = self._client_of(node, parsed.metrics, seen, connected)
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
        connected = set(self._grid.get_node_ids()) if self._grid else set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if not reply.has_error():
                received[node] = payload_bytes(reply.content)
            if reply.has_error():
                failed[node] = failure_of(reply.error)
                log(WARNING, "round %d: node %d dropped out: %s", server_round, node, failed[node])
                self.ledger.reply(self._attempt, node, self.known.get(node), None, "failed")
                continue
            try:  # any exception is the reply's fault: it must never end the round
                name, weight, rate, metrics, update = self._check(reply, seen, connected)
            except Exception as exc:  # noqa: BLE001
                why = _rejection(exc)
                rejected[node] = why[:500]
                log(WARNING, "round %d: rejected reply from node %d: %s", server_round, node, why)
                claimed = self.known.get(node) or self._claimed(reply, node)
                rate = self._rejected_rate(reply, claimed)
                self.ledger.reply(self._attempt, node, claimed, rate, "rejected")
                continue
            self.ledger.reply(self._attempt, node, name, rate, "kept")
            self._bind(node, name)
            per_client[node] = metrics
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
            seconds=None if self.private else time.monotonic() - self._started,
            slowest_client_seconds=max(times, default=None) if not self.private else None,
            per_client=per_client,
            bytes_sent=self._sent,
            bytes_received=received,
        )
        log(
            INFO,
            "round %d: %d clients kept (%d failed, %d rejected), epsilon %s%s",
            report.round,
            report.clients,
            len(failed),
            len(rejected),
            f"{report.epsilon:.3f}" if report.epsilon is not None else "-",
            f", {report.seconds:.1f} s" if report.seconds is not None else "",
        )
        self.on_round(report, arrays)
        self.ledger.done(self._attempt)  # only once the round and its line are saved
        return arrays, MetricRecord({"clients": len(updates)})

    def _claimed(self, reply: Message, node: int) -> str | None:
        """Who a rejected reply said it was, if that much can be read (to charge its budget)."""
        partition = _claimed_number(reply, PARTITION_ID)
        if partition is None:
            return None
        if partition == OUTSIDE_CLIENT:
            return outside_client(node)
        planned = 0 <= partition < len(self.plan.partitions)
        return in_cluster_client(int(partition)) if planned else None

    def _rejected_rate(self, reply: Message, claimed: str | None) -> float | None:
        """An outside client's rate for its rejected reply: its own, from the examples it
        claims, never below the plan's outside rate (all there is when it claims nothing)."""
        noise = self.plan.noise
        if noise is None or claimed is None or claimed.isdigit():
            return None  # in-cluster clients are charged every attempt at their planned rate
        if self.central:
            return 1.0
        n = _claimed_number(reply, NUM_EXAMPLES)
        own = sample_rate(math.ceil(n), self.cfg.federation.batch_size) if n and n > 0 else None
        return max((r for r in (own, noise.outside_rate) if r is not None), default=None)

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
