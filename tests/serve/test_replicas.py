"""Autoscaling bounds are honoured: `min_replicas: 2` starts two engine replicas, and `/health`
says "not ready" (503) while they load, then 200; past a key's rate limit, completions get 429.

Each CPU replica reserves 2 logical CPUs (its actor and its placement-group bundle), so the
local head is given 4 logical CPUs; the 2 physical cores are shared (about 2 minutes here).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve

from cluster.core.config import load_config
from cluster.core.serve_config import ServeConfig
from serve.deploy import deploy

pytestmark = [pytest.mark.slow, pytest.mark.integration]
KEY = "sk-replicas"


def poll_health(url: str, seen: list[tuple[int, dict]], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            # With the key: the not-ready message names the deployments only to a key holder.
            reply = httpx.get(url, timeout=10, headers={"Authorization": f"Bearer {KEY}"})
            seen.append((reply.status_code, reply.json()))
        except (httpx.HTTPError, ValueError):  # proxy not up yet, or not our route yet
            pass
        time.sleep(0.5)


def complete(url: str) -> httpx.Response:
    return httpx.post(
        f"{url}/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
        json={"model": "fedforge-tiny-base", "prompt": "Hi", "max_tokens": 2},
    )


def test_min_replicas_two_runs_two_engines(provisioned, tmp_path, monkeypatch):
    raw = yaml.safe_load(Path("configs/serve/tiny.yaml").read_text())
    raw["autoscaling"].update(min_replicas=2, max_replicas=2)
    raw["http_port"] = 8011
    raw["auth"].update(rate_limit_per_minute=2, rate_limit_burst=6)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path, ServeConfig)
    monkeypatch.setenv("FEDFORGE_API_KEYS", KEY)
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    seen: list[tuple[int, dict]] = []
    stop = threading.Event()
    health = f"http://127.0.0.1:{cfg.http_port}/health"
    poller = threading.Thread(target=poll_health, args=(health, seen, stop), daemon=True)
    try:
        poller.start()
        url = deploy(cfg, provisioned)
        stop.set()
        poller.join()
        # The ingress routes long before the engines have loaded the model: not ready, then ok.
        not_ready = [b for code, b in seen if code == 503 and b["error"]["code"] == "not_ready"]
        assert not_ready, f"no 503 not_ready seen while starting: {seen[:3]}"
        assert "EngineServer" in not_ready[0]["error"]["message"]
        assert httpx.get(health, timeout=10).json()["status"] == "ok"
        deployments = serve.status().applications[cfg.name].deployments
        engine = next(d for name, d in deployments.items() if "EngineServer" in name)
        assert engine.replica_states.get("RUNNING") == 2
        codes = [complete(url).status_code for _ in range(4)]
        assert codes == [200] * 4
        # 4 of the key's 6-request burst are spent; at 2 per minute one token takes 30 s.
        replies = [complete(url) for _ in range(4)]
        codes = [r.status_code for r in replies]
        limited = next((r for r in replies if r.status_code == 429), None)
        assert codes[:2] == [200, 200] and 429 in codes[2:], codes
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(limited.headers["Retry-After"]) <= 30
        listed = httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"})
        assert listed.status_code == 200  # only completions count against the limit
    finally:
        stop.set()
        serve.shutdown()
        ray.shutdown()
