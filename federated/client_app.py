"""Flower ClientApp: train the received global adapter on this node's data, send it back.

Which data: an in-cluster SuperNode's node config names its planned partition (`partition-id`);
an outside SuperNode names its own file (`data-path`, and may point `state-dir` at its own
provisioned models). The config and the plan come from the run config (federated.run_config).
Per-client state that must outlive the message (cumulative steps, the privacy accountant's
history) lives in `context.state`, which the SuperNode keeps for the whole run.

Flower starts a fresh process for every message. An in-cluster SuperNode's node config names a
warm trainer (a Ray actor placed with the node): the ClientApp then only imports Flower and Ray
and hands the round to that actor, which keeps torch and the base model loaded. Nothing this
module imports may import torch; only an outside node's ClientApp trains in its own process.

When training fails, the server is told only the class of the error: its message can quote this
node's data (an example the tokenizer choked on), and the server is not trusted with that under
local DP. The whole error goes to this node's own log.
"""

from __future__ import annotations

from logging import ERROR

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.common.constant import ErrorCode

from federated.node_task import ClientState, NodeResult, NodeTask
from federated.protocol import TrainTask
from federated.run_config import RAY_NAMESPACE, NodeConfig, RunSpec


def _train(task: NodeTask) -> NodeResult:
    """Train here (an outside node), or hand the task to the node's warm trainer."""
    if task.node.warm_trainer is None:
        from federated.local_train import train_for_node

        return train_for_node(task)
    import ray

    from cluster.core.ray_cluster import connect

    connect(task.node.ray_address, namespace=RAY_NAMESPACE, quiet=True)
    trainer = ray.get_actor(task.node.warm_trainer, namespace=RAY_NAMESPACE)
    return ray.get(trainer.train.remote(task))


def _class_of(exc: Exception) -> str:
    """The error's class name (a warm trainer's error arrives wrapped by Ray: its cause's)."""
    cause = getattr(exc, "cause", None)
    return type(cause if isinstance(cause, Exception) else exc).__name__


def build_client_app(run_config: dict[str, str] | None = None) -> ClientApp:
    """The ClientApp; `run_config` stands in for Flower's where none is passed (simulation)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        try:
            node = NodeConfig.from_flower(context.node_config)
            run = RunSpec.from_flower({**(run_config or {}), **context.run_config}, node)
            task = TrainTask.from_content(msg.content)
            result = _train(NodeTask(run, node, task, ClientState.load(context.state)))
        except Exception as exc:  # noqa: BLE001 - every failure is answered, by its class only
            log(ERROR, "training failed", exc_info=exc)
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=_class_of(exc))
            return Message(error, reply_to=msg)
        result.client.save(context.state)
        return Message(content=result.reply.to_content(), reply_to=msg)

    return app


app = build_client_app()
