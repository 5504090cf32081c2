"""Loading base models and tokenizers from a path `StateDir.base_model` resolved."""

from __future__ import annotations

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizer


def load_tokenizer(path: str) -> PreTrainedTokenizer:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: str = "float32") -> PreTrainedModel:
    # A per-tensor progress bar from every Ray worker drowns the step logs.
    transformers.logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
