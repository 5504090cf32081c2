"""Flower ClientApp: train the received global adapter on this node's partition, send it back.

The node's `partition-id` comes from its node config (set per SuperNode, or by the simulation);
everything else comes from the validated YAML named in the run config. Per-client state that
must outlive the message (cumulative steps, the privacy accountant's history) lives in
`context.state`, which the SuperNode keeps for the whole run.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federated.config import from_run_config
from federated.local_train import train_round
from federated.privacy import epsilon_of, history_from_record, history_to_record

STEPS_KEY, HISTORY_KEY = "fedforge-steps", "fedforge-dp-history"


def _partition_id(context: Context, num_clients: int) -> int:
    partition = int(context.node_config["partition-id"])
    if not 0 <= partition < num_clients:
        raise ValueError(f"partition-id {partition} is outside 0..{num_clients - 1}")
    return partition


def build_client_app(run_config: dict[str, str] | None = None) -> ClientApp:
    """The ClientApp; `run_config` stands in for Flower's where none is passed (simulation)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, state = from_run_config({**(run_config or {}), **context.run_config})
        steps_record = context.state.get(STEPS_KEY, MetricRecord({"steps": 0}))
        result = train_round(
            cfg,
            state,
            _partition_id(context, cfg.federation.num_clients),
            msg.content.array_records["arrays"],
            steps_done=int(steps_record["steps"]),
            history=history_from_record(context.state.get(HISTORY_KEY)),
        )
        context.state[STEPS_KEY] = MetricRecord({"steps": result.steps})
        metrics = MetricRecord(
            {
                "train_loss": result.train_loss,
                "steps": result.steps,
                "num-examples": result.num_examples,
                # Central DP averages clients uniformly: its noise is calibrated to that.
                "unit-weight": 1,
            }
        )
        if cfg.privacy.mode == "local_dp":
            context.state[HISTORY_KEY] = history_to_record(result.history)
            metrics["epsilon"] = epsilon_of(
                result.history, cfg.privacy.delta, cfg.privacy.accountant
            )
        content = RecordDict({"arrays": result.arrays, "metrics": metrics})
        return Message(content=content, reply_to=msg)

    return app


app = build_client_app()
