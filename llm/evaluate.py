"""Held-out evaluation: loss, perplexity and exact-match accuracy of generated answers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.core.config import TrainingJobConfig
from llm.data import Example, collate, encode_example, load_split, render_prompt
from llm.lora import load_adapter
from llm.losses import answer_token_losses
from llm.model import load_model, load_tokenizer


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    accuracy: float
    examples: int

    def as_metrics(self, prefix: str = "eval") -> dict[str, float]:
        lead = f"{prefix}_" if prefix else ""
        return {
            f"{lead}loss": self.loss,
            f"{lead}perplexity": self.perplexity,
            f"{lead}accuracy": self.accuracy,
        }


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def validation_loss(
    model,
    tokenizer,
    examples: list[Example],
    max_length: int,
    batch_size: int,
    system_prompt: str | None = None,
) -> float:
    """Mean loss per answer token (the same masking as training)."""
    total, tokens = 0.0, 0
    encoded = [encode_example(tokenizer, e, max_length, system_prompt) for e in examples]
    for batch in _batches(encoded, batch_size):
        inputs = collate(batch, tokenizer.pad_token_id)
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).logits
        losses, counted = answer_token_losses(logits, inputs["labels"])
        total += losses.sum().item()
        tokens += int(counted.sum())
    return total / max(tokens, 1)


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split()).lower()


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    examples: list[Example],
    max_new_tokens: int,
    batch_size: int,
    system_prompt: str | None = None,
) -> list[str]:
    """Greedy answers, batched with left padding (decoder-only models continue on the right)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for batch in _batches(examples, batch_size):
            prompts = [render_prompt(tokenizer, e, system_prompt) for e in batch]
            inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = out[:, inputs["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def evaluate(
    model,
    tokenizer,
    examples: list[Example],
    *,
    max_length: int,
    max_new_tokens: int,
    batch_size: int,
    system_prompt: str | None = None,
) -> EvalResult:
    model.eval()
    loss = validation_loss(model, tokenizer, examples, max_length, batch_size, system_prompt)
    answers = generate_answers(
        model, tokenizer, examples, max_new_tokens, batch_size, system_prompt
    )
    hits = sum(
        normalize_answer(a) == normalize_answer(e.answer)
        for a, e in zip(answers, examples, strict=False)
    )
    return EvalResult(
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        accuracy=hits / len(examples),
        examples=len(examples),
    )


def evaluate_heldout(
    cfg: TrainingJobConfig, model_path: str, adapter_dir: Path | None
) -> EvalResult:
    """Held-out metrics of the base model (adapter_dir None) or of base + adapter."""
    split = load_split(cfg.data)
    model = load_model(model_path, cfg.model.dtype)
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir)
    return evaluate(
        model,
        load_tokenizer(model_path),
        split.validation[: cfg.eval.max_examples],
        max_length=cfg.data.max_length,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        system_prompt=cfg.data.system_prompt,
    )
