"""Serving latency and throughput: the bare vLLM OpenAI server against the fedforge endpoint.

Same model, engine settings and machine, one after the other in one run (never both at once:
they would share the CPUs). Each server is swept on the base model and on a LoRA adapter (the
fine-tune config's rank and target modules): bare vLLM loads it with `--lora-modules`, fedforge
serves it from a bench registry as `<name>` (production alias). Each request is a streamed chat
answer of exactly `--tokens` tokens; TTFT is the time to the first content chunk. Cold start is
process start to the first answer (not to the first /v1/models: Serve's ingress lists models
before the engine can answer).

    python scripts/bench_serve.py [--config configs/serve/demo.yaml] [--tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from serve_harness import end_token_bias

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.core.config import load_config  # noqa: E402
from cluster.core.jobs import SERVE  # noqa: E402
from cluster.core.serve_config import ServeConfig  # noqa: E402
from cluster.core.state import StateDir  # noqa: E402

KEY = "sk-bench"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ADAPTER = "bench-adapter"
# The targets: against bare vLLM, and absolute at a given concurrency.
THROUGHPUT_RATIO, LATENCY_RATIO, TTFT_P99_S, LATENCY_P99_S = 0.95, 1.05, 0.2, 2.0


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        env={**os.environ, **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=REPO,
    )


def first_answer(base_url: str, model: str, proc: subprocess.Popen, started: float) -> float:
    """Seconds from `started` (process start) to the first answered chat request."""
    body = {"model": model, "messages": QUESTION, "max_tokens": 1}
    headers = {"Authorization": f"Bearer {KEY}"}
    while time.monotonic() - started < 600:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            url = f"{base_url}/chat/completions"
            answer = httpx.post(url, json=body, headers=headers, timeout=5)
            if answer.status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} gave no answer within 600 s")


def make_adapter(state: StateDir, finetune_config: str, base: str) -> tuple[Path, str]:
    """A LoRA adapter for the served model, registered as ADAPTER (production) in a bench registry.

    Its B matrices are random: vLLM runs the same LoRA kernels whatever the values, and the
    answer must stay non-empty for a fixed 32-token stream (end tokens biased away)."""
    import torch

    from cluster.core.config import FinetuneConfig
    from cluster.records.lineage import Lineage
    from cluster.records.registry import Registry
    from llm.lora import apply_lora, save_adapter
    from llm.model import load_model

    root = state.root / "bench" / "registry"
    shutil.rmtree(root, ignore_errors=True)
    lora = load_config(REPO / finetune_config, FinetuneConfig).lora
    model = apply_lora(load_model(state.base_model(base)), lora, seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    adapter_dir = save_adapter(model, root / "adapter")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    registry = Registry(tracking_uri, root / "artifacts")
    with registry.run("bench-serve", ADAPTER, {}) as run_id:
        lineage = Lineage(kind="bench", base_model=base, lora_rank=lora.r)
        version = registry.register_adapter(ADAPTER, adapter_dir, run_id, lineage, alias=None)
    registry.promote(ADAPTER, version.version)
    return adapter_dir, tracking_uri


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# Token ids the model may end an answer with, biased to -100 so every answer runs exactly
# `--tokens` tokens. OpenAI's `logit_bias`, not vLLM's `ignore_eos`: fedforge's contract refuses
# vLLM-only fields, and both servers get the same body. Set by main() from the tokenizer.
END_TOKEN_BIAS: dict[str, int] = {}


async def one_request(client: httpx.AsyncClient, url: str, model: str, tokens: int):
    body = {
        "model": model,
        "messages": QUESTION,
        "max_tokens": tokens,
        "stream": True,
        "logit_bias": END_TOKEN_BIAS,
        "temperature": 0,
    }
    started = time.perf_counter()
    ttft = None
    async with client.stream(
        "POST", f"{url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if ttft is None and line.startswith("data: ") and '"content"' in line:
                ttft = time.perf_counter() - started
    return ttft, time.perf_counter() - started


async def sweep_level(url: str, model: str, concurrency: int, requests: int, tokens: int):
    queue = asyncio.Queue()
    for _ in range(requests):
        queue.put_nowait(None)
    results = []

    async def worker(client):
        while not queue.empty():
            queue.get_nowait()
            results.append(await one_request(client, url, model, tokens))

    async with httpx.AsyncClient(timeout=300) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ttfts = [r[0] for r in results]
    totals = [r[1] for r in results]
    return {
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": max(ttfts) if len(ttfts) < 100 else statistics.quantiles(ttfts, n=100)[98],
        "lat_p50": statistics.median(totals),
        "lat_p99": max(totals) if len(totals) < 100 else statistics.quantiles(totals, n=100)[98],
        "tok_s": requests * tokens / wall,
    }


def requests_at(concurrency: int) -> int:
    """Requests per level: at least 4 waves, so one slow request moves the p50s less."""
    return max(16, 4 * concurrency)


def run_sweep(name: str, url: str, model: str, levels: list[int], tokens: int) -> list[dict]:
    asyncio.run(sweep_level(url, model, 1, 2, tokens))  # warm-up
    rows = []
    for c in levels:
        stats = asyncio.run(sweep_level(url, model, c, requests_at(c), tokens))
        rows.append({"server": name, "concurrency": c, **stats})
        print(f"  {name} c={c}: {stats}", flush=True)
    return rows


def sweep_base_and_adapter(
    server: str, url: str, base_id: str, levels: list[int], tokens: int
) -> list[dict]:
    return run_sweep(server, url, base_id, levels, tokens) + run_sweep(
        f"{server} + adapter", url, ADAPTER, levels, tokens
    )


def print_tables(rows: list[dict]) -> None:
    print(
        "| server | concurrency | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms "
        "| output tok/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['server']} | {r['concurrency']} | {r['ttft_p50'] * 1000:.0f} | "
            f"{r['ttft_p99'] * 1000:.0f} | {r['lat_p50'] * 1000:.0f} | "
            f"{r['lat_p99'] * 1000:.0f} | {r['tok_s']:.1f} |"
        )
    by_key = {(r["server"], r["concurrency"]): r for r in rows}
    print("\n| fedforge vs bare vLLM | concurrency | throughput | p50 latency | all targets met |")
    print("|---|---|---|---|---|")
    for r in rows:
        if not r["server"].startswith("fedforge"):
            continue
        bare = by_key[(r["server"].replace("fedforge", "bare vLLM"), r["concurrency"])]
        throughput, latency = r["tok_s"] / bare["tok_s"], r["lat_p50"] / bare["lat_p50"]
        met = (
            throughput >= THROUGHPUT_RATIO
            and latency <= LATENCY_RATIO
            and r["ttft_p99"] < TTFT_P99_S
            and r["lat_p99"] < LATENCY_P99_S
        )
        print(
            f"| {r['server']} | {r['concurrency']} | {throughput:.2f}x | {latency:.2f}x | "
            f"{'yes' if met else 'no'} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/serve/demo.yaml")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--levels", default="1,2,4,8,16")
    parser.add_argument("--finetune-config", default="configs/finetune/demo.yaml")
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    levels = [int(c) for c in args.levels.split(",")]
    state = StateDir.resolve(REPO / ".fedforge")
    logs = state.root / "bench"
    logs.mkdir(exist_ok=True)
    # One engine on each side: pin fedforge to one replica so autoscaling does not start a
    # second engine mid-sweep on the same CPUs.
    raw = yaml.safe_load((REPO / args.config).read_text())
    raw["autoscaling"].update(min_replicas=1, max_replicas=1)
    adapter_dir, tracking_uri = make_adapter(state, args.finetune_config, raw["model"]["base"])
    raw["registry"] = {"tracking_uri": tracking_uri}
    raw["adapters"].update(enabled=True, models=[ADAPTER], refresh_seconds=1)
    config_path = logs / "serve-one-replica.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(config_path, ServeConfig)
    END_TOKEN_BIAS.update(end_token_bias(state.base_model(cfg.model.base)))
    engine_env = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.engine.kv_cache_gb)}
    rows, cold = [], {}

    bare_port = cfg.http_port + 100
    # Same engine on both sides: LoRA enabled, same limits.
    lora_flags = [
        "--enable-lora",
        f"--max-loras={cfg.engine.max_loras}",
        f"--max-lora-rank={cfg.engine.max_lora_rank}",
        f"--lora-modules={ADAPTER}={adapter_dir}",
    ]
    started = time.monotonic()
    bare = start(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(bare_port),
            "--model",
            state.base_model(cfg.model.base),
            "--served-model-name",
            cfg.model_id,
            "--dtype",
            cfg.engine.dtype,
            "--max-model-len",
            str(cfg.engine.max_model_len),
            "--enforce-eager",
            *lora_flags,
            "--api-key",
            KEY,
        ],
        engine_env,
        logs / "bare-vllm.log",
    )
    try:
        url = f"http://127.0.0.1:{bare_port}/v1"
        cold["bare vLLM"] = first_answer(url, cfg.model_id, bare, started)
        rows += sweep_base_and_adapter("bare vLLM", url, cfg.model_id, levels, args.tokens)
    finally:
        stop(bare)

    started = time.monotonic()
    fedforge = start(
        [
            sys.executable,
            "-m",
            SERVE.module,
            "--config",
            str(config_path),
            "--state-dir",
            str(state.root),
        ],
        {"FEDFORGE_API_KEYS": KEY, "RAY_ADDRESS": ""},
        logs / "fedforge-serve.log",
    )
    try:
        url = f"http://{cfg.http_host}:{cfg.http_port}/v1"
        cold["fedforge"] = first_answer(url, cfg.model_id, fedforge, started)
        # The adapter's first request downloads it from the registry and loads it.
        cold["fedforge adapter"] = first_answer(url, ADAPTER, fedforge, started)
        rows += sweep_base_and_adapter("fedforge", url, cfg.model_id, levels, args.tokens)
    finally:
        stop(fedforge)

    print(
        f"\n{cfg.model.base} ({cfg.engine.dtype}), streamed chat answers of {args.tokens} "
        f"tokens, {requests_at(levels[0])}+ requests per level; cold start (process start to "
        "first answer; fedforge includes starting a local Ray head): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in cold.items())
    )
    print_tables(rows)


if __name__ == "__main__":
    main()
