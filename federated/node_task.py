"""One node's round as its ClientApp hands it to whoever trains: itself, or the warm trainer.

In-cluster ClientApps pass a `NodeTask` to a long-lived Ray actor (`WarmTrainer`) and get a
`NodeResult` back, so this module, like everything the ClientApp imports, stays free of torch.
Per-client state that must outlive Flower's per-message process (cumulative steps, the client's
privacy ledger) lives in `context.state` as a `ClientState`, saved before the reply is sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from federated.privacy.ledger import Charge
from federated.protocol import STEPS, TrainReply, TrainTask
from federated.run_config import NodeConfig, RunSpec

STEPS_RECORD, LEDGER_RECORD = "fedforge-steps", "fedforge-ledger"  # in context.state
_COLUMNS = ("attempt", "round", "noise", "rate", "steps", "assumed")  # of the ledger record


@dataclass(frozen=True)
class ClientState:
    """What a client keeps between rounds of one run (Flower's `context.state`)."""

    steps: int = 0  # local steps over every round this client trained in
    ledger: tuple[Charge, ...] = ()  # every release charged to this client, in attempt order

    @classmethod
    def load(cls, state: RecordDict) -> ClientState:
        steps = int(state[STEPS_RECORD][STEPS]) if STEPS_RECORD in state else 0
        if LEDGER_RECORD not in state:
            return cls(steps)
        record = state[LEDGER_RECORD]
        rows = zip(*(record[c] for c in _COLUMNS), strict=True)
        return cls(
            steps, tuple(Charge(int(a), int(r), n, q, int(k), bool(x)) for a, r, n, q, k, x in rows)
        )

    def save(self, state: RecordDict) -> None:
        state[STEPS_RECORD] = MetricRecord({STEPS: self.steps})
        if self.ledger:
            state[LEDGER_RECORD] = ConfigRecord(
                {
                    "attempt": [c.attempt for c in self.ledger],
                    "round": [c.round for c in self.ledger],
                    "noise": [float(c.noise) for c in self.ledger],
                    "rate": [float(c.rate) for c in self.ledger],
                    "steps": [c.steps for c in self.ledger],
                    "assumed": [c.assumed for c in self.ledger],
                }
            )


@dataclass(frozen=True)
class NodeTask:
    run: RunSpec
    node: NodeConfig
    task: TrainTask
    client: ClientState


@dataclass(frozen=True)
class NodeResult:
    reply: TrainReply
    client: ClientState  # after this round
