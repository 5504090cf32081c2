"""Example-level DP-SGD with Opacus on the LoRA tensors, and its privacy accounting.

Each client keeps its accountant's history in Flower's `context.state`, so epsilon accumulates
over every round it trained in, not just the latest one.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader

from cluster.errors import UserError
from cluster.federated_config import FederatedConfig
from cluster.privacy_record import PrivacyRecord, RoundPrivacy
from federated.node_task import History
from federated.plan import NoisePlan
from federated.strategy import RoundReport
from llm.data import collate
from llm.losses import per_example_loss

# Beyond this the noise drowns the clipped gradient (its norm is at most max_grad_norm per
# example, the noise's is sigma * max_grad_norm per coordinate): training cannot learn.
MAX_USEFUL_NOISE = 10.0


class PrivacyPlanError(UserError):
    """No noise meets the configured privacy target. The message is meant for users."""


def sample_rate(n_examples: int, batch_size: int) -> float:
    """Poisson sampling rate Opacus' DPDataLoader derives from a DataLoader (1 / len(loader))."""
    return 1 / math.ceil(n_examples / batch_size)


def noise_for_target(
    target_epsilon: float,
    delta: float,
    rate: float,
    steps: int,
    accountant: str,
    max_noise: float = MAX_USEFUL_NOISE,
) -> float:
    """Noise multiplier meeting (target_epsilon, delta) after `steps`, else PrivacyPlanError."""
    where = (
        f"privacy.target_epsilon {target_epsilon} at delta {delta} over {steps} steps at "
        f"sampling rate {rate:.4g}"
    )
    hint = "raise target_epsilon or delta, or train fewer rounds/local_steps or smaller batches"
    try:
        noise = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=rate,
            steps=steps,
            accountant=accountant,
        )
    except ValueError as exc:  # Opacus gives up above a noise multiplier of 1e6
        raise PrivacyPlanError(f"{where} cannot be met by any noise ({exc}): {hint}") from None
    if noise > max_noise:
        raise PrivacyPlanError(
            f"{where} needs noise multiplier {noise:.1f}, above {max_noise}: noise that large "
            f"drowns the clipped gradients and the adapter learns nothing; {hint}"
        )
    return noise


def epsilon_of(history: History, delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    fresh = create_accountant(mechanism=accountant)
    fresh.history = list(history)
    return float(fresh.get_epsilon(delta=delta))


def recompute_epsilon(
    steps: int, rate: float, noise_multiplier: float, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon from the logged numbers alone, independent of any training process."""
    return epsilon_of([(noise_multiplier, rate, steps)], delta, accountant)


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


def privacy_record(
    cfg: FederatedConfig, noise: NoisePlan | None, rounds: list[RoundReport]
) -> PrivacyRecord:
    """The run's privacy guarantee and how it grew: what the registry and `privacy report` show.

    `epsilon` is the worst (largest) over clients and rounds: each client's guarantee is at
    least this good. `steps` and `sample_rate` are the planned per-client totals.
    """
    dp = cfg.privacy
    by_round = [
        RoundPrivacy(
            round=r.round,
            epsilon=r.epsilon,
            clients={str(c.partition): c.epsilon for c in r.per_client.values()},
        )
        for r in rounds
    ]
    if noise is None:
        return PrivacyRecord(mode="none", by_round=by_round)
    return PrivacyRecord(
        mode=dp.mode,
        epsilon=max((r.worst for r in by_round if r.worst is not None), default=None),
        delta=dp.delta,
        noise_multiplier=noise.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        sample_rate=noise.sample_rate,
        steps=noise.steps,
        accountant=dp.accountant,
        by_round=by_round,
    )
