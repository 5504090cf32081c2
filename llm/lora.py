"""LoRA adapters: attach to a base model, save atomically, load back.

The adapter directory (adapter_config.json + adapter_model.safetensors) is the unit that moves
between training, federated rounds, the registry and vLLM.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from cluster.core.config import LoraSettings


def apply_lora(
    model: PreTrainedModel,
    settings: LoraSettings,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> PeftModel:
    """Wrap `model` with fresh LoRA matrices (base weights frozen), on `device` if given."""
    if device is not None:
        # Device move before peft wraps the model (opacus#820: the reverse corrupts LoRA updates).
        model = model.to(device)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
    )
    # Fork the RNG: seeding globally would also fix the noise of any DP optimizer later on.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path, trainable: bool = False):
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def save_adapter(model: PeftModel, target: str | Path) -> Path:
    """Write the adapter next to `target` and rename it into place: never a half-written dir."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(str(staging))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
