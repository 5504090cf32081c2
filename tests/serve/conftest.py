"""Fixtures shared by the serving tests: tiny LoRA adapters and a registry to put them in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.config import LoraSettings
from cluster.registry import Registry
from cluster.state import StateDir


@pytest.fixture(scope="session")
def tiny_adapters(provisioned: StateDir, tmp_path_factory) -> list[Path]:
    """Two random LoRA adapters (r=4 on q/v) for the tiny model that answer differently."""
    from llm.lora import apply_lora, save_adapter
    from llm.model import load_model

    root = tmp_path_factory.mktemp("adapters")
    adapters = []
    for seed in (1, 2):
        model = apply_lora(load_model(str(provisioned.tiny_model)), LoraSettings(r=4), seed=seed)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            for name, param in model.named_parameters():
                if "lora_B" in name:  # peft starts B at zero: the adapter would change nothing
                    param.normal_(0, 0.5)
        adapters.append(save_adapter(model, root / f"adapter-{seed}"))
    return adapters


def register(registry: Registry, adapter_dir: Path, name: str, base_model: str = "tiny") -> str:
    """Register `adapter_dir` as a new version of `name` (no alias) and return its number."""
    with registry.run("serve-tests", name, {}) as run_id:
        tags = {"fedforge.base_model": base_model, "fedforge.kind": "test"}
        version = registry.register_adapter(name, adapter_dir, run_id, tags, alias=None)
    return str(version.version)
