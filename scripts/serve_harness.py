"""What the serving scripts share: an endpoint on a local Ray head, the replicas' memory, a
plain request, fixed-length answers and percentiles.

Scripts import it as `from serve_harness import ...` (scripts/ is on sys.path when a script in
it runs).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Process titles of Ray Serve replicas: `ray::ServeReplica:<app>:<deployment class>`.
REPLICAS = {"ingress": "KeyCheckedIngress", "engine": "EngineServer"}


def replica_processes(role: str) -> list[psutil.Process]:
    """Serve replica processes of one role ("ingress" or "engine") of the Ray head this process
    started: its descendants only, never another cluster's replicas on the same host."""
    marker = REPLICAS[role]
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "ServeReplica" in title and marker in title:
            found.append(proc)
    return found


def replica_rss_mb() -> dict[str, float]:
    """Resident memory of the ingress and engine replicas (each with its children), in MB."""
    found: dict[str, float] = {}
    for role in REPLICAS:
        for proc in replica_processes(role):
            try:
                procs = [proc, *proc.children(recursive=True)]
                found[role] = found.get(role, 0) + sum(p.memory_info().rss for p in procs) / 2**20
            except psutil.Error:
                pass
    return {k: round(v, 1) for k, v in found.items()}


def normal_request(url: str, key: str, model: str, timeout: float = 120) -> dict:
    """A plain chat request: {"status", "answered"} (and the body's start when unanswered)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    try:
        response = httpx.post(
            f"{url}/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        return {"status": None, "answered": False, "body": type(exc).__name__}
    answered = response.status_code == 200 and bool(response.json().get("choices"))
    found = {"status": response.status_code, "answered": answered}
    return found if answered else {**found, "body": response.text[:300]}


def start_endpoint(
    config: str,
    key: str,
    num_cpus: int = 2,
    overrides: dict | None = None,
    quiet: bool = False,
):
    """A local Ray head with the endpoint of `config` (sections updated from `overrides`);
    returns (url, served config, stop). `quiet` keeps the replicas' per-request logs out of
    this process' output."""
    import ray
    from ray import serve

    from cluster.core.config import load_config
    from cluster.core.serve_config import ServeConfig
    from cluster.core.state import StateDir
    from serve.deploy import deploy

    os.environ["FEDFORGE_API_KEYS"] = key
    cfg = load_config(config, ServeConfig)
    if overrides:
        cfg = ServeConfig.model_validate(_merged(cfg.model_dump(), overrides))
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet)
    url = deploy(cfg, StateDir.resolve(None))

    def stop() -> None:
        serve.shutdown()
        ray.shutdown()

    return url, cfg, stop


def _merged(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) else value
    return out


def end_token_bias(model_dir: str) -> dict[str, int]:
    """OpenAI `logit_bias` that keeps the model from ending early, so every answer runs exactly
    max_tokens tokens (fedforge refuses vLLM's own `ignore_eos`; both servers get this body)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = tokenizer.get_vocab()
    ends = {vocab[t] for t in (tokenizer.eos_token, "<|im_end|>", "<|endoftext|>") if t in vocab}
    return {str(i): -100 for i in sorted(ends)}


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile by nearest rank (p99 of under 100 values is their maximum)."""
    if not values:
        return None
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, math.ceil(q / 100 * len(ranked)) - 1))]
