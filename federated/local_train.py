"""One client's share of a round: start from the global adapter, train on its own partition.

The model, data encoding, batching and the plain optimizer step are llm/'s; only the DP step
(federated.privacy) differs, because Opacus needs per-example losses and Poisson batches.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord
from peft import PeftModel

from cluster.state import StateDir
from federated.adapter_state import adapter_to_arrays, arrays_to_adapter
from federated.config import OUTSIDE_CLIENT, FederatedConfig
from federated.dp_history import History
from federated.partition import client_partitions
from federated.privacy import dp_train_step, epsilon_of, make_private
from llm.data import Example, encode_example, load_examples
from llm.lora import apply_lora
from llm.model import load_model, load_tokenizer, resolve_model_path
from llm.training import rank_batch, train_step


@dataclass(frozen=True)
class LocalResult:
    arrays: ArrayRecord
    train_loss: float
    steps: int  # cumulative over every round this client trained in
    num_examples: int
    history: History  # the accountant's, empty without local DP
    seconds: float  # model load + local steps: the client's compute for the round
    partition: int = -1  # the node's data partition, -1 for an outside node's own data
    epsilon: float | None = None  # after this round, at the configured delta (local DP)


@functools.lru_cache(maxsize=1)
def _base_model(model_path: str, dtype: str, device: str) -> torch.nn.Module:
    """Loaded once per process: a warm trainer reuses it every round (a copy gets the LoRA)."""
    return load_model(model_path, dtype).to(device)


@functools.lru_cache(maxsize=1)
def _tokenizer(model_path: str):
    return load_tokenizer(model_path)


def lora_model(cfg: FederatedConfig, model_path: str, device: torch.device) -> PeftModel:
    base = copy.deepcopy(_base_model(model_path, cfg.model.dtype, str(device)))
    return apply_lora(base, cfg.lora, cfg.federation.seed, device)


def _cycle(loader) -> Iterator[dict[str, torch.Tensor]]:
    while True:  # a Poisson loader's epoch is len(loader) draws; rounds may span several
        yield from loader


def train_round(
    cfg: FederatedConfig,
    model_path: str,
    examples: list[Example],
    data_seed: int,
    global_arrays: ArrayRecord,
    steps_done: int,
    history: History,
) -> LocalResult:
    started = time.perf_counter()
    fed, dp = cfg.federation, cfg.privacy
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = _tokenizer(model_path)
    encoded = [
        encode_example(tokenizer, e, cfg.data.max_length, cfg.data.system_prompt) for e in examples
    ]
    model = lora_model(cfg, model_path, device)
    arrays_to_adapter(model, global_arrays)
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=fed.learning_rate
    )
    losses: list[float] = []
    if dp.mode == "local_dp":
        model, optimizer, loader, engine = make_private(
            model,
            optimizer,
            encoded,
            batch_size=fed.batch_size,
            pad_id=tokenizer.pad_token_id,
            noise_multiplier=cfg.noise_multiplier(),
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
        for step in range(steps_done, steps_done + fed.local_steps):
            # Steps continue across rounds, so each round sees the next batches of the epoch.
            batch = rank_batch(
                encoded, step, 0, 1, fed.batch_size, data_seed, tokenizer.pad_token_id
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            losses.append(float(train_step(model, optimizer, batch, fed.learning_rate)))
    return LocalResult(
        arrays=adapter_to_arrays(model),
        train_loss=sum(losses) / len(losses) if losses else float("nan"),
        steps=steps_done + fed.local_steps,
        num_examples=len(examples),
        history=history,
        seconds=time.perf_counter() - started,
    )


def _local_data(cfg: FederatedConfig, node_config: dict) -> tuple[int, list[Example]]:
    """An outside node's own file (`data-path`), or an in-cluster node's partition."""
    if "data-path" in node_config:
        return OUTSIDE_CLIENT, load_examples(str(node_config["data-path"]))
    partition = int(node_config["partition-id"])
    if not 0 <= partition < cfg.federation.num_clients:
        raise ValueError(f"partition-id {partition} is outside 0..{cfg.federation.num_clients - 1}")
    return partition, client_partitions(cfg)[partition]


def worst_case_history(cfg: FederatedConfig, rounds_before: int) -> History:
    """The history of a client that trained in every one of `rounds_before` rounds.

    A resumed run has fresh SuperNode state, so the rounds before the restart are charged this
    way: epsilon can only be over-, never under-reported.
    """
    if rounds_before == 0 or cfg.privacy.mode != "local_dp":
        return []
    _, rate = cfg.dp_steps_and_rate()
    return [(cfg.noise_multiplier(), rate, rounds_before * cfg.federation.local_steps)]


def train_for_node(
    cfg: FederatedConfig,
    state: StateDir,
    node_config: dict,
    global_arrays: ArrayRecord,
    steps_done: int,
    history: History | None,
    rounds_before: int,
) -> LocalResult:
    """One SuperNode's round: its data, the global adapter in, its adapter and epsilon out.

    `history` None means this node has no accountant state (a fresh or resumed run).
    """
    partition, examples = _local_data(cfg, node_config)
    if history is None:
        history = worst_case_history(cfg, rounds_before)
    result = train_round(
        cfg,
        resolve_model_path(cfg.model.base, state),
        examples,
        cfg.federation.seed + partition,
        global_arrays,
        steps_done,
        history,
    )
    epsilon = (
        epsilon_of(result.history, cfg.privacy.delta, cfg.privacy.accountant)
        if cfg.privacy.mode == "local_dp"
        else None
    )
    return dataclasses.replace(result, partition=partition, epsilon=epsilon)
