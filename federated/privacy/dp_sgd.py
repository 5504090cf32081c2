"""Example-level DP-SGD with Opacus on the LoRA tensors: wrapping a model, one noisy step."""

from __future__ import annotations

from functools import partial

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader

from federated.privacy.ledger import History
from llm.data import collate
from llm.losses import per_example_loss


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    encoded: list[dict[str, list[int]]],
    *,
    batch_size: int,
    pad_id: int,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant: str,
    history: History,
):
    """Opacus-wrap a LoRA model (already on its device) and its optimizer; resume accounting.

    Returns (model, optimizer, Poisson-sampled loader, engine). Only parameters that require
    grad (the LoRA tensors) get per-sample gradients.
    """
    engine = PrivacyEngine(accountant=accountant)
    engine.accountant.history = list(history)
    loader = DataLoader(
        encoded, batch_size=batch_size, collate_fn=partial(collate, pad_token_id=pad_id)
    )
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,  # the sampling the accountant's analysis assumes
    )
    # Opacus builds its own empty batch from the first example's types, which fails for our
    # dict examples; a zero-row batch of the right keys still makes a (noise-only) step.
    loader.collate_fn = partial(collate_or_empty, pad_token_id=pad_id)
    return model, optimizer, loader, engine


def collate_or_empty(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    if not examples:
        empty = torch.zeros((0, 1), dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty, "labels": empty}
    return collate(examples, pad_token_id)


def dp_train_step(model, optimizer, batch: dict[str, torch.Tensor], lr: float) -> float | None:
    """One DP-SGD step; returns the batch's loss, or None when Poisson sampling drew nobody."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if batch["input_ids"].shape[0] == 0:
        # Still a noisy step: skipping it would leak that the batch was empty. A transformer
        # cannot run on zero rows, so hand Opacus the empty per-sample gradients directly.
        for param in optimizer.params:
            param.grad_sample = torch.zeros((0, *param.shape), device=param.device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return None
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = per_example_loss(logits, batch["labels"]).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
