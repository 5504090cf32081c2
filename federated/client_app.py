"""Flower ClientApp: train the received global adapter on this node's data, send it back.

Which data: an in-cluster SuperNode has `partition-id` in its node config (its share of the
configured dataset); an outside SuperNode names its own file with `data-path` (and may point
`state-dir` at its own provisioned models). Everything else comes from the validated config in
the run config. Per-client state that must outlive the message (cumulative steps, the privacy
accountant's history) lives in `context.state`, which the SuperNode keeps for the whole run.

Flower starts a fresh process for every message. An in-cluster SuperNode's node config names a
warm trainer (`warm-trainer`, a Ray actor placed with the node): the ClientApp then only imports
Flower and Ray and hands the round to that actor, which keeps torch and the base model loaded.
This module must therefore not import torch at the top.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federated.config import from_run_config
from federated.dp_history import history_from_record, history_to_record

STEPS_KEY, HISTORY_KEY = "fedforge-steps", "fedforge-dp-history"
ROUND_OFFSET_KEY = "round-offset"  # rounds done before this run started (a resumed run)
WARM_TRAINER_KEY, RAY_ADDRESS_KEY = "warm-trainer", "ray-address"  # node config of in-cluster nodes
RAY_NAMESPACE = "fedforge"


def _train(node_config: dict, *args):
    trainer = node_config.get(WARM_TRAINER_KEY)
    if not trainer:
        from federated.local_train import train_for_node

        return train_for_node(*args)
    import ray

    if not ray.is_initialized():
        ray.init(
            address=str(node_config[RAY_ADDRESS_KEY]),
            namespace=RAY_NAMESPACE,
            log_to_driver=False,
        )
    actor = ray.get_actor(str(trainer), namespace=RAY_NAMESPACE)
    return ray.get(actor.train.remote(*args))


def build_client_app(run_config: dict[str, str] | None = None) -> ClientApp:
    """The ClientApp; `run_config` stands in for Flower's where none is passed (simulation)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node_config = dict(context.node_config)
        cfg, state = from_run_config({**(run_config or {}), **context.run_config}, node_config)
        config = msg.content.config_records.get("config", ConfigRecord())
        steps_record = context.state.get(STEPS_KEY, MetricRecord({"steps": 0}))
        history = (
            history_from_record(context.state[HISTORY_KEY])
            if HISTORY_KEY in context.state
            else None
        )
        result = _train(
            node_config,
            cfg,
            state,
            node_config,
            msg.content.array_records["arrays"],
            int(steps_record["steps"]),
            history,
            int(config.get(ROUND_OFFSET_KEY, 0)),
        )
        context.state[STEPS_KEY] = MetricRecord({"steps": result.steps})
        metrics = MetricRecord(
            {
                "train_loss": result.train_loss,
                "steps": result.steps,
                "num-examples": result.num_examples,
                "partition-id": result.partition,
                "train-seconds": result.seconds,
                # Central DP averages clients uniformly: its noise is calibrated to that.
                "unit-weight": 1,
            }
        )
        if result.epsilon is not None:
            context.state[HISTORY_KEY] = history_to_record(result.history)
            metrics["epsilon"] = result.epsilon
        content = RecordDict({"arrays": result.arrays, "metrics": metrics})
        return Message(content=content, reply_to=msg)

    return app


app = build_client_app()
