"""Fixtures of the serving tests (helpers they share live in harness.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.core.config import LoraSettings
from cluster.core.state import StateDir
from tests.serve.harness import TINY_RANK


@pytest.fixture(scope="session")
def tiny_adapters(provisioned: StateDir, tmp_path_factory) -> list[Path]:
    """Two random LoRA adapters (r=TINY_RANK on q/v) for the tiny model that answer differently."""
    import torch

    from llm.lora import apply_lora, save_adapter
    from llm.model import load_model

    root = tmp_path_factory.mktemp("adapters")
    adapters = []
    for seed in (1, 2):
        lora = LoraSettings(r=TINY_RANK)
        model = apply_lora(load_model(str(provisioned.tiny_model)), lora, seed=seed)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            for name, param in model.named_parameters():
                if "lora_B" in name:  # peft starts B at zero: the adapter would change nothing
                    param.normal_(0, 0.5)
        adapters.append(save_adapter(model, root / f"adapter-{seed}"))
    return adapters
