"""Pure training helpers shared by the Ray Train loop, federated clients and the benchmarks.

No Ray here: a data order that depends only on (seed, step), the LoRA model and its optimizer,
and one optimizer step.
"""

from __future__ import annotations

import random

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from cluster.core.config import FinetuneConfig, LoraSettings
from llm.data import collate, encode_example, load_split
from llm.lora import apply_lora
from llm.model import load_model


def encoded_train_set(cfg: FinetuneConfig, tokenizer) -> list[dict[str, list[int]]]:
    return [
        encode_example(tokenizer, e, cfg.data.max_length, cfg.data.system_prompt)
        for e in load_split(cfg.data).train
    ]


def batch_indices(n_examples: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Indices of the global batch for `step`: epochs are seeded permutations laid end to end."""
    start = step * global_batch
    indices: list[int] = []
    while len(indices) < global_batch:
        epoch, offset = divmod(start + len(indices), n_examples)
        order = list(range(n_examples))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        indices += order[offset : offset + global_batch - len(indices)]
    return indices


def rank_batch(
    encoded: list, step: int, rank: int, world: int, batch_size: int, seed: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """This rank's disjoint slice of the global batch for `step`.

    The global batch is sorted by length and dealt out in turn, so every rank gets about the same
    number of tokens: in data-parallel steps the slowest rank sets the pace for all.
    """
    indices = batch_indices(len(encoded), step, batch_size * world, seed)
    by_length = sorted(indices, key=lambda i: len(encoded[i]["input_ids"]))
    return collate([encoded[i] for i in by_length[rank::world]], pad_id)


def learning_rate(step: int, peak: float, warmup: int) -> float:
    return peak * min(1.0, (step + 1) / warmup) if warmup else peak


def lora_model_and_optimizer(
    base: PreTrainedModel,
    lora: LoraSettings,
    device: torch.device | str,
    *,
    seed: int,
    learning_rate: float,
    weight_decay: float,
) -> tuple[PeftModel, torch.optim.AdamW]:
    """The model to train and its optimizer: fine-tuning's and every federated client's.

    In the order Opacus needs (opacus#820): `base` on `device`, then fresh LoRA matrices, then
    AdamW over the trainable (LoRA) tensors only. The model is in training mode; a DP caller
    wraps both afterwards (federated.privacy.make_private).
    """
    model = apply_lora(base, lora, seed, device)
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=learning_rate,
        weight_decay=weight_decay,
    )
    return model, optimizer


def finetune_model_and_optimizer(
    cfg: FinetuneConfig, model_path: str, device: torch.device | str = "cpu"
) -> tuple[PeftModel, torch.optim.AdamW]:
    """lora_model_and_optimizer with a fine-tuning run's base model and train settings."""
    return lora_model_and_optimizer(
        load_model(model_path, cfg.model.dtype),
        cfg.lora,
        device,
        seed=cfg.train.seed,
        learning_rate=cfg.train.learning_rate,
        weight_decay=cfg.train.weight_decay,
    )


def train_step(model, optimizer, batch: dict[str, torch.Tensor], lr: float) -> torch.Tensor:
    """One optimizer step on the answer-token loss; returns the (detached) loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
