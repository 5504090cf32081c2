"""The loss fedforge trains and evaluates on: cross-entropy of the answer tokens only.

Labels are the input ids shifted by one, with IGNORE_INDEX on the prompt and padding (see
llm.data.encode_example), so the prompt never counts.
"""

from __future__ import annotations

import torch

from llm.data import IGNORE_INDEX


def answer_token_losses(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss of every next-token prediction, mask of the ones that are answer tokens), both
    shaped (batch, length - 1); masked positions have loss 0."""
    targets = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        targets.flatten(),
        reduction="none",
        ignore_index=IGNORE_INDEX,
    ).view(targets.shape)
    return losses, targets != IGNORE_INDEX


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean answer-token loss of each example on its own.

    Not the model's batch-wide token mean: there every example's gradient is scaled by the
    token count of the whole batch, so under DP-SGD one example would change the others'
    contributions.
    """
    losses, counted = answer_token_losses(logits, labels)
    return losses.sum(dim=1) / counted.sum(dim=1).clamp(min=1)
