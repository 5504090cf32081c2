"""An in-process stand-in for Flower's Grid, with clients that answer like fedforge's ClientApp
without training (their update is a small fixed step): for the server's side of a run (the
strategy, the ledger, the round files) at the speed of a unit test.

A fake, named as such: Flower's real Grid needs a SuperLink and SuperNode processes (covered by
the integration tests). What runs for real here is everything of fedforge's on both sides:
`serve_rounds`, GuardedStrategy, the ledger, RunFiles, TrainTask/TrainReply, and the client's
own ledger (`federated.local_train.client_ledger`) kept in a per-node `context.state`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from opacus.accountants import RDPAccountant

from cluster.core.federated_config import FederatedConfig
from cluster.core.state import StateDir
from federated.local_train import client_ledger
from federated.node_task import ClientState, NodeTask
from federated.plan import FederatedPlan
from federated.privacy.accounting import epsilon_of
from federated.privacy.ledger import history_of, sample_rate
from federated.protocol import OUTSIDE_CLIENT, TrainMetrics, TrainReply, TrainTask
from federated.run_config import NodeConfig, RunSpec

Answer = Callable[[Message], Message]


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float = 1e-5) -> float:
    """The independent recomputation: Opacus' RDP accountant given an explicit history."""
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta=delta)


def step(arrays: ArrayRecord, size: float) -> ArrayRecord:
    return ArrayRecord(
        {
            k: Array((v.numpy() + np.float32(size)).astype(v.numpy().dtype))
            for k, v in arrays.items()
        }
    )


@dataclass
class HonestClient:
    """Answers like train_for_node would, and keeps its ledger in its own context.state."""

    spec: RunSpec
    partition: int  # OUTSIDE_CLIENT: brings `examples` of its own
    examples: int = 0
    delta: float = 1e-3  # the size of every coordinate of its update
    state: RecordDict = field(default_factory=RecordDict)
    reported: list[float | None] = field(default_factory=list)  # its epsilon, each round

    def restart(self) -> None:
        """Its SuperNode restarted: Flower's context.state is gone."""
        self.state = RecordDict()

    def __call__(self, msg: Message) -> Message:
        cfg, plan = self.spec.cfg, self.spec.plan
        task = TrainTask.from_content(msg.content)
        n = (
            self.examples
            if self.partition == OUTSIDE_CLIENT
            else len(plan.partitions[self.partition])
        )
        node = (
            NodeConfig(data_path="own.jsonl")
            if self.partition == OUTSIDE_CLIENT
            else NodeConfig(partition=self.partition)
        )
        client = ClientState.load(self.state)
        charges, _ = client_ledger(
            NodeTask(self.spec, node, task, client), sample_rate(n, cfg.federation.batch_size)
        )
        local = cfg.privacy.mode == "local_dp"
        dp = cfg.privacy  # as train_for_node reports it
        epsilon = epsilon_of(history_of(charges), dp.delta, dp.accountant) if local else None
        steps = client.steps + cfg.federation.local_steps
        ClientState(steps, tuple(charges)).save(self.state)  # before it replies
        self.reported.append(epsilon)
        private = cfg.privacy.mode != "none"
        metrics = TrainMetrics(
            num_examples=n,
            steps=steps,
            partition=self.partition,
            train_loss=None if private else 1.0,
            train_seconds=None if private else 0.1,
            epsilon=epsilon,
        )
        return Message(
            TrainReply(step(task.arrays, self.delta), metrics).to_content(), reply_to=msg
        )


class LoopbackGrid:
    """Stands in for Flower's Grid: node ids, and each message answered by its node's client."""

    def __init__(self, clients: dict[int, Answer]) -> None:
        self.clients = clients

    def get_node_ids(self) -> list[int]:
        return list(self.clients)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        return [self.clients[m.metadata.dst_node_id](m) for m in messages]


def spec(cfg: FederatedConfig, plan: FederatedPlan, state: StateDir) -> RunSpec:
    return RunSpec(cfg, plan, state)
