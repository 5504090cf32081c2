"""Instruction datasets: loading, a deterministic split, chat-template rendering, label masking.

An example is a conversation whose last message is the assistant's answer. Files hold either
`messages` (chat format) or `prompt` / `response` columns; other columns (e.g. `team`) are kept
as metadata so federated partitions can be skewed by them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cluster.core.config import DataSettings
from cluster.core.digest import tree_sha256
from cluster.core.errors import UserError

IGNORE_INDEX = -100  # positions the loss skips: everything but the answer


class DatasetError(UserError):
    """The dataset file is missing or a record has the wrong shape. The message is for users."""


@dataclass(frozen=True)
class Example:
    prompt_messages: list[dict[str, str]]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Split:
    train: list[Example]
    validation: list[Example]


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        return [dict(row) for row in loaded]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in {".jsonl", ".json"}:
        rows = []
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{line_no}: not valid JSON: {exc.msg}") from None
        return rows
    raise DatasetError(
        f"{path}: unsupported dataset format (use .jsonl, .parquet or a datasets dir)"
    )


def _to_example(row: dict[str, Any], where: str) -> Example:
    if "messages" in row:
        messages = row["messages"]
        if (
            not isinstance(messages, list)
            or len(messages) < 2
            or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages)
        ):
            raise DatasetError(f"{where}: 'messages' must be a list of {{role, content}} (2+)")
        if messages[-1]["role"] != "assistant":
            raise DatasetError(f"{where}: the last message must be the assistant's answer")
        meta = {k: v for k, v in row.items() if k != "messages"}
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        return Example(prompt, messages[-1]["content"], meta)
    if "prompt" in row and "response" in row:
        meta = {k: v for k, v in row.items() if k not in {"prompt", "response"}}
        return Example([{"role": "user", "content": row["prompt"]}], row["response"], meta)
    raise DatasetError(f"{where}: a record needs 'messages' or 'prompt' and 'response'")


def load_examples(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    rows = _read_rows(path)
    if not rows:
        raise DatasetError(f"{path}: the dataset is empty")
    return [_to_example(row, f"{path} record {i}") for i, row in enumerate(rows)]


def dataset_sha256(path: str | Path) -> str:
    """Content hash of a dataset file, or of every file in a dataset directory (sorted)."""
    return tree_sha256(path)


def example_content(example: Example) -> str:
    """What identifies an example: its messages and answer (metadata such as `team` is not)."""
    return json.dumps([example.prompt_messages, example.answer], sort_keys=True)


def _example_key(example: Example, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{example_content(example)}".encode()).hexdigest()


def split_examples(examples: list[Example], validation_fraction: float, seed: int) -> Split:
    """Hold out a fixed share by hashing each example's content with the seed.

    The split depends only on content and seed, not on file order, so the validation set stays
    the same when rows are shuffled or appended.
    """
    ranked = sorted(examples, key=lambda e: _example_key(e, seed))
    n_val = max(1, round(len(examples) * validation_fraction))
    if n_val >= len(examples):
        raise DatasetError(f"{len(examples)} examples are too few to hold out {n_val}")
    return Split(train=ranked[n_val:], validation=ranked[:n_val])


def load_split(data: DataSettings) -> Split:
    """The configured dataset's split, its training part narrowed to the configured share.

    The central share is the head of the (content-hash ranked) training part, so it, the
    clients' share and the held-out split never overlap and never depend on file order.
    """
    split = split_examples(load_examples(data.path), data.validation_fraction, data.split_seed)
    if data.share == "all":
        return split
    n_central = round(len(split.train) * data.central_fraction)
    train = split.train[:n_central] if data.share == "central" else split.train[n_central:]
    if not train:
        raise DatasetError(f"the '{data.share}' share of {data.path} is empty")
    return Split(train=train, validation=split.validation)


def render_prompt(tokenizer, example: Example, system_prompt: str | None = None) -> str:
    messages = example.prompt_messages
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_example(
    tokenizer, example: Example, max_length: int, system_prompt: str | None = None
) -> dict[str, list[int]]:
    """Token ids and labels where only the answer (and its end-of-turn) count in the loss."""
    prompt = render_prompt(tokenizer, example, system_prompt)
    messages = [
        *([{"role": "system", "content": system_prompt}] if system_prompt else []),
        *example.prompt_messages,
        {"role": "assistant", "content": example.answer},
    ]
    if system_prompt and example.prompt_messages[0]["role"] == "system":
        messages = messages[1:]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise DatasetError("the chat template renders the prompt differently inside a full chat")
    # Tokenize the two parts separately so the boundary is exact whatever the tokenizer merges.
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids[:max_length]
    prompt_ids = prompt_ids[
        max(0, len(prompt_ids) + len(answer_ids) - max_length) :
    ]  # keep the end
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
    }


def collate(batch: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions are masked out of attention and loss."""
    width = max(len(item["input_ids"]) for item in batch)
    input_ids, labels, attention = [], [], []
    for item in batch:
        pad = width - len(item["input_ids"])
        input_ids.append(item["input_ids"] + [pad_token_id] * pad)
        labels.append(item["labels"] + [IGNORE_INDEX] * pad)
        attention.append([1] * len(item["input_ids"]) + [0] * pad)
    return {
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(attention),
    }
