"""Flower ClientApp: train the received global adapter on this node's data, send it back.

Which data: an in-cluster SuperNode has `partition-id` in its node config (its share of the
configured dataset); an outside SuperNode names its own file with `data-path` (and may point
`state-dir` at its own provisioned models). Everything else comes from the validated config in
the run config. Per-client state that must outlive the message (cumulative steps, the privacy
accountant's history) lives in `context.state`, which the SuperNode keeps for the whole run.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federated.config import FederatedConfig, from_run_config
from federated.local_train import train_round
from federated.partition import client_partitions
from federated.privacy import History, epsilon_of, history_from_record, history_to_record
from llm.data import Example, load_examples
from llm.model import resolve_model_path

STEPS_KEY, HISTORY_KEY = "fedforge-steps", "fedforge-dp-history"
OUTSIDE_CLIENT = -1  # the partition id reported by a SuperNode that brings its own data
ROUND_OFFSET_KEY = "round-offset"  # rounds done before this run started (a resumed run)


def _local_data(cfg: FederatedConfig, node_config: dict) -> tuple[int, list[Example]]:
    if "data-path" in node_config:
        return OUTSIDE_CLIENT, load_examples(str(node_config["data-path"]))
    partition = int(node_config["partition-id"])
    if not 0 <= partition < cfg.federation.num_clients:
        raise ValueError(f"partition-id {partition} is outside 0..{cfg.federation.num_clients - 1}")
    return partition, client_partitions(cfg)[partition]


def _prior_history(cfg: FederatedConfig, context: Context, config: ConfigRecord) -> History:
    """This client's accountant history; after a resumed run, the worst case for earlier rounds.

    A restarted run has fresh SuperNode state, so the rounds before the restart are charged as
    if this client had trained in every one of them: epsilon can only be over-, never
    under-reported.
    """
    if HISTORY_KEY in context.state:
        return history_from_record(context.state[HISTORY_KEY])
    earlier = int(config.get(ROUND_OFFSET_KEY, 0))
    if earlier == 0:
        return []
    steps, rate = cfg.dp_steps_and_rate()
    per_round = steps // cfg.federation.rounds
    return [(cfg.noise_multiplier(), rate, earlier * per_round)]


def build_client_app(run_config: dict[str, str] | None = None) -> ClientApp:
    """The ClientApp; `run_config` stands in for Flower's where none is passed (simulation)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node_config = dict(context.node_config)
        cfg, state = from_run_config({**(run_config or {}), **context.run_config}, node_config)
        partition, examples = _local_data(cfg, node_config)
        config = msg.content.config_records.get("config", ConfigRecord())
        steps_record = context.state.get(STEPS_KEY, MetricRecord({"steps": 0}))
        result = train_round(
            cfg,
            resolve_model_path(cfg.model.base, state),
            examples,
            cfg.federation.seed + partition,
            msg.content.array_records["arrays"],
            steps_done=int(steps_record["steps"]),
            history=_prior_history(cfg, context, config),
        )
        context.state[STEPS_KEY] = MetricRecord({"steps": result.steps})
        metrics = MetricRecord(
            {
                "train_loss": result.train_loss,
                "steps": result.steps,
                "num-examples": result.num_examples,
                "partition-id": partition,
                "train-seconds": result.seconds,
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
