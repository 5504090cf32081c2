"""One node's round as its ClientApp hands it to whoever trains: itself, or the warm trainer.

In-cluster ClientApps pass a `NodeTask` to a long-lived Ray actor (`WarmTrainer`) and get a
`NodeResult` back, so this module, like everything the ClientApp imports, stays free of torch.
Per-client state that must outlive Flower's per-message process (cumulative steps, the privacy
accountant's history) lives in `context.state` as a `ClientState`.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from federated.protocol import STEPS, TrainReply, TrainTask
from federated.run_config import NodeConfig, RunSpec

History = list[tuple[float, float, int]]  # Opacus' accountant: (noise_multiplier, rate, steps)

STEPS_RECORD, HISTORY_RECORD = "fedforge-steps", "fedforge-dp-history"  # in context.state
NOISE, RATE = "noise", "rate"  # columns of the history record, next to STEPS


@dataclass(frozen=True)
class ClientState:
    """What a client keeps between rounds of one run (Flower's `context.state`)."""

    steps: int = 0  # local steps over every round this client trained in
    history: History | None = None  # None: no accountant state yet (a fresh or resumed node)

    @classmethod
    def load(cls, state: RecordDict) -> ClientState:
        steps = int(state[STEPS_RECORD][STEPS]) if STEPS_RECORD in state else 0
        if HISTORY_RECORD not in state:
            return cls(steps)
        record = state[HISTORY_RECORD]
        return cls(steps, list(zip(record[NOISE], record[RATE], record[STEPS], strict=True)))

    def save(self, state: RecordDict) -> None:
        state[STEPS_RECORD] = MetricRecord({STEPS: self.steps})
        if self.history:
            state[HISTORY_RECORD] = ConfigRecord(
                {
                    NOISE: [float(h[0]) for h in self.history],
                    RATE: [float(h[1]) for h in self.history],
                    STEPS: [int(h[2]) for h in self.history],
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
