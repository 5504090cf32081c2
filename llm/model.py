"""Loading base models and tokenizers: the provisioned demo model, a local directory or a hub id."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizer

from cluster.state import StateDir

DEMO = "demo"
TINY = "tiny"


class ModelNotFoundError(FileNotFoundError):
    """The configured base model cannot be found locally."""


def resolve_model_path(base: str, state: StateDir) -> str:
    """Map a config's `model.base` to something `from_pretrained` accepts."""
    if base in (DEMO, TINY):
        path = state.demo_model if base == DEMO else state.tiny_model
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"the {base} model is not provisioned at {path}; run `scripts/setup.sh` "
                "(or `python -m llm.demo_model --tiny --state-dir ...`) first"
            )
        return str(path)
    if base.startswith((".", "/", "~")) and not Path(base).expanduser().is_dir():
        raise ModelNotFoundError(f"model directory not found: {base}")
    return str(Path(base).expanduser()) if Path(base).expanduser().is_dir() else base


def load_tokenizer(path: str) -> PreTrainedTokenizer:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: str = "float32") -> PreTrainedModel:
    # A per-tensor progress bar from every Ray worker drowns the step logs.
    transformers.logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
