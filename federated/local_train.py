"""One client's share of a round: start from the global adapter, train on its own partition.

The model, data encoding, batching and the plain optimizer step are llm/'s; only the DP step
(federated.privacy) differs, because Opacus needs per-example losses and Poisson batches.
`train_for_node` runs in the ClientApp's process (outside nodes) or in the node's warm trainer.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord
from peft import PeftModel

from cluster.core.errors import UserError
from cluster.core.federated_config import FederatedConfig
from federated.adapter_state import adapter_to_arrays, arrays_to_adapter
from federated.node_task import ClientState, NodeResult, NodeTask
from federated.partition import client_examples
from federated.privacy.accounting import epsilon_of
from federated.privacy.dp_sgd import dp_train_step, make_private
from federated.privacy.ledger import (
    Attempt,
    Charge,
    History,
    client_charges,
    history_of,
    sample_rate,
)
from federated.protocol import OUTSIDE_CLIENT, TrainMetrics, TrainReply
from federated.run_config import NodeConfig, RunSpec
from llm.data import Example, encode_example, load_examples
from llm.lora import apply_lora
from llm.model import load_model, load_tokenizer
from llm.training import lora_model_and_optimizer, rank_batch, train_step

# torch's AdamW default, which clients have always trained with (the config has no field for it).
LOCAL_WEIGHT_DECAY = 0.01


@dataclass(frozen=True)
class LocalResult:
    arrays: ArrayRecord
    train_loss: float
    client: ClientState  # steps after this round (the ledger is train_for_node's)
    seconds: float  # model load + local steps: the client's compute for the round
    history: History = ()  # the accountant's history after this round (DP only)


@functools.lru_cache(maxsize=1)
def _base_model(model_path: str, dtype: str, device: str) -> torch.nn.Module:
    """Loaded once per process: a warm trainer reuses it every round (a copy gets the LoRA)."""
    return load_model(model_path, dtype).to(device)


@functools.lru_cache(maxsize=1)
def _tokenizer(model_path: str):
    return load_tokenizer(model_path)


def _fresh_base(cfg: FederatedConfig, model_path: str, device: torch.device) -> torch.nn.Module:
    """A copy of the process's cached base model on `device`, for one round's LoRA to wrap."""
    return copy.deepcopy(_base_model(model_path, cfg.model.dtype, str(device)))


def lora_model(cfg: FederatedConfig, model_path: str, device: torch.device) -> PeftModel:
    """The run's LoRA model without an optimizer: the server's initial adapter, evaluation."""
    return apply_lora(_fresh_base(cfg, model_path, device), cfg.lora, cfg.federation.seed, device)


def client_model_and_optimizer(
    cfg: FederatedConfig, model_path: str, device: torch.device
) -> tuple[PeftModel, torch.optim.AdamW]:
    """lora_model_and_optimizer with the run's base model and local training settings."""
    return lora_model_and_optimizer(
        _fresh_base(cfg, model_path, device),
        cfg.lora,
        device,
        seed=cfg.federation.seed,
        learning_rate=cfg.federation.learning_rate,
        weight_decay=LOCAL_WEIGHT_DECAY,
    )


def _cycle(loader) -> Iterator[dict[str, torch.Tensor]]:
    while True:  # a Poisson loader's epoch is len(loader) draws; rounds may span several
        yield from loader


def train_round(
    cfg: FederatedConfig,
    model_path: str,
    examples: list[Example],
    *,
    data_seed: int,
    arrays: ArrayRecord,
    client: ClientState,
    noise_multiplier: float | None = None,
    history: History = (),
) -> LocalResult:
    """Local steps from the global `arrays`: DP-SGD when a noise multiplier is given, its
    accountant resumed from `history` (the result's `history` adds this round's steps)."""
    started = time.perf_counter()
    fed, dp = cfg.federation, cfg.privacy
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = _tokenizer(model_path)
    encoded = [
        encode_example(tokenizer, e, cfg.data.max_length, cfg.data.system_prompt) for e in examples
    ]
    model, optimizer = client_model_and_optimizer(cfg, model_path, device)
    arrays_to_adapter(model, arrays)  # in place: the optimizer keeps the same tensors
    losses: list[float] = []
    history = list(history)
    if noise_multiplier is not None:
        model, optimizer, loader, engine = make_private(
            model,
            optimizer,
            encoded,
            batch_size=fed.batch_size,
            pad_id=tokenizer.pad_token_id,
            noise_multiplier=noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            accountant=dp.accountant,
            history=history,
        )
        batches = _cycle(loader)
        for _ in range(fed.local_steps):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            loss = dp_train_step(model, optimizer, batch, fed.learning_rate)
            if loss is not None:
                losses.append(loss)
        history = list(engine.accountant.history)
    else:
        for step in range(client.steps, client.steps + fed.local_steps):
            # Steps continue across rounds, so each round sees the next batches of the epoch.
            batch = rank_batch(
                encoded, step, 0, 1, fed.batch_size, data_seed, tokenizer.pad_token_id
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            losses.append(float(train_step(model, optimizer, batch, fed.learning_rate)))
    return LocalResult(
        arrays=adapter_to_arrays(model),
        train_loss=sum(losses) / len(losses) if losses else float("nan"),
        client=ClientState(client.steps + fed.local_steps, client.ledger),
        seconds=time.perf_counter() - started,
        history=tuple(history),
    )


def _local_data(run: RunSpec, node: NodeConfig) -> tuple[int, list[Example]]:
    """An outside node's own file, or an in-cluster node's planned partition."""
    if node.data_path is not None:
        return OUTSIDE_CLIENT, load_examples(node.data_path)
    return node.partition, client_examples(run.cfg.data, run.plan, node.partition)


class TaskRefused(UserError):
    """This client will not train on this task (its data or the asked noise breaks the plan)."""


def client_ledger(task: NodeTask, rate: float) -> tuple[list[Charge], Attempt]:
    """This client's ledger including the task's attempt (earlier unknown ones assumed)."""
    cfg, plan = task.run.cfg, task.run.plan
    current = task.task.current
    if plan.noise is None:
        return list(task.client.ledger), current
    if current.noise is None or current.noise < plan.noise.noise_multiplier:
        raise TaskRefused(
            f"the server asked for noise {current.noise}, below the planned "
            f"{plan.noise.noise_multiplier:g}: refusing to train"
        )
    if cfg.privacy.mode == "central_dp":
        return list(task.client.ledger), current  # the server's release; nothing to charge here
    charges = client_charges(
        list(task.client.ledger),
        list(task.task.schedule),
        current,
        rate,
        cfg.federation.local_steps,
    )
    return charges, current


def train_for_node(task: NodeTask) -> NodeResult:
    """One SuperNode's round: its data, the global adapter in, its adapter and epsilon out."""
    partition, examples = _local_data(task.run, task.node)
    return train_on(task, partition, examples)


def train_on(
    task: NodeTask,
    partition: int,
    examples: list[Example],
    train_cfg: FederatedConfig | None = None,
) -> NodeResult:
    """A node's round on `examples` (its partition's, or an outside node's own): the ledger
    charged, local training (DP-SGD under local_dp), the reply. `train_cfg` overrides the run's
    config for the local training only (the privacy audit gives its canary client more steps)."""
    cfg = task.run.cfg
    local_dp = cfg.privacy.mode == "local_dp"
    rate = sample_rate(len(examples), cfg.federation.batch_size)
    if local_dp and partition == OUTSIDE_CLIENT and rate > task.run.plan.noise.sample_rate:
        raise TaskRefused(
            f"this client has {len(examples)} examples, fewer than the "
            f"{cfg.flower.external_min_examples} the run's noise was calibrated for "
            "(flower.external_min_examples): training would exceed the privacy target"
        )
    charges, current = client_ledger(task, rate)
    result = train_round(
        train_cfg or cfg,
        task.run.state.base_model(cfg.model.base),
        examples,
        data_seed=cfg.federation.seed + partition,
        arrays=task.task.arrays,
        client=task.client,
        noise_multiplier=current.noise if local_dp else None,
        history=history_of(charges[:-1]) if local_dp else (),
    )
    epsilon = (
        epsilon_of(history_of(charges), cfg.privacy.delta, cfg.privacy.accountant)
        if local_dp
        else None
    )
    private = cfg.privacy.mode != "none"
    metrics = TrainMetrics(
        num_examples=len(examples),
        steps=result.client.steps,
        partition=partition,
        train_loss=None if private or math.isnan(result.train_loss) else result.train_loss,
        train_seconds=None if private else result.seconds,
        epsilon=epsilon,
    )
    client = ClientState(result.client.steps, tuple(charges))
    return NodeResult(TrainReply(result.arrays, metrics), client)
