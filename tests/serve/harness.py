"""Helpers the serving tests share: the endpoint on a fresh local Ray head, and registering a
tiny adapter. A helper module, imported by tests; conftest.py only holds fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cluster.core.state import StateDir
from cluster.records.lineage import Lineage
from cluster.records.registry import Registry

TINY_RANK = 4  # the rank of `tiny_adapters`, within configs/serve/tiny.yaml's max_lora_rank


@contextmanager
def serving(cfg, state: StateDir, key: str, **ray_options) -> Iterator[str]:
    """The endpoint of `cfg` on a fresh local Ray head, with `key` as its only API key; yields
    its base URL and shuts Serve and Ray down afterwards."""
    import ray
    from ray import serve

    from serve.deploy import deploy

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("FEDFORGE_API_KEYS", key)
    ray.init(address="local", num_cpus=2, include_dashboard=False, **ray_options)
    try:
        yield deploy(cfg, state)
    finally:
        serve.shutdown()
        ray.shutdown()
        monkeypatch.undo()


def register(
    registry: Registry,
    adapter_dir: Path,
    name: str,
    base_model: str = "tiny",
    lora_rank: int | None = TINY_RANK,
) -> str:
    """Register `adapter_dir` as a new version of `name` (no alias) and return its number."""
    lineage = Lineage(kind="test", base_model=base_model, lora_rank=lora_rank)
    with registry.run("serve-tests", name, {}) as run_id:
        version = registry.register_adapter(name, adapter_dir, run_id, lineage, alias=None)
    return version.version
