"""Autoscaling bounds are honoured: `min_replicas: 2` starts two engine replicas.

Each CPU replica reserves 2 logical CPUs (its actor and its placement-group bundle), so the
local head is given 4 logical CPUs; the 2 physical cores are shared (about 2 minutes here).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve

from cluster.config import load_config
from serve.config import ServeConfig
from serve.deploy import deploy

pytestmark = [pytest.mark.slow, pytest.mark.integration]
KEY = "sk-replicas"


def test_min_replicas_two_runs_two_engines(provisioned, tmp_path, monkeypatch):
    raw = yaml.safe_load(Path("configs/serve/tiny.yaml").read_text())
    raw["autoscaling"].update(min_replicas=2, max_replicas=2)
    raw["http_port"] = 8011
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path, ServeConfig)
    monkeypatch.setenv("FEDFORGE_API_KEYS", KEY)
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        url = deploy(cfg, provisioned)
        deployments = serve.status().applications[cfg.name].deployments
        engine = next(d for name, d in deployments.items() if "LLMServer" in name)
        assert engine.replica_states.get("RUNNING") == 2
        for _ in range(4):
            reply = httpx.post(
                f"{url}/completions",
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=60,
                json={"model": "fedforge-tiny-base", "prompt": "Hi", "max_tokens": 2},
            )
            assert reply.status_code == 200
    finally:
        serve.shutdown()
        ray.shutdown()
