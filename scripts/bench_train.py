"""Training throughput: the Ray Train loop (1 and 2 workers) against a plain peft loop.

Same model, per-worker batch, sequence length and data; same step function (llm.training).
The plain loop is one process with one torch thread; each Ray Train worker gets one CPU, so
"tokens/s per CPU" compares like with like. Ray Train's figure is wall time between steps as
the job sees it: DDP all-reduce, reporting and checkpointing included.

    python scripts/bench_train.py [--model demo|tiny] [--steps 12] [--warmup 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.core.config import FinetuneConfig  # noqa: E402
from cluster.core.state import StateDir  # noqa: E402
from cluster.records.registry import Registry  # noqa: E402
from llm.model import load_tokenizer  # noqa: E402
from llm.train_loop import make_trainer  # noqa: E402
from llm.training import (  # noqa: E402
    encoded_train_set,
    finetune_model_and_optimizer,
    learning_rate,
    rank_batch,
    train_step,
)


def bench_config(model: str, steps: int, workers: int) -> FinetuneConfig:
    raw = yaml.safe_load((REPO / "configs/finetune/demo.yaml").read_text())
    raw["model"]["base"] = model
    raw["data"]["path"] = str(REPO / raw["data"]["path"])
    raw["train"].update(max_steps=steps, checkpoint_every=steps, warmup_steps=0)
    raw["scaling"].update(num_workers=workers, cpus_per_worker=1)
    raw["name"] = f"bench-{workers}w-{time.time_ns()}"
    return FinetuneConfig.model_validate(raw)


def plain_loop(cfg: FinetuneConfig, model_path: str, warmup: int) -> list[float]:
    """tokens/s per step of a single-process peft loop (1 thread)."""
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(model_path)
    encoded = encoded_train_set(cfg, tokenizer)
    model, optimizer = finetune_model_and_optimizer(cfg, model_path)
    rates = []
    last = time.perf_counter()
    for step in range(cfg.train.max_steps):
        batch = rank_batch(
            encoded, step, 0, 1, cfg.train.batch_size, cfg.train.seed, tokenizer.pad_token_id
        )
        train_step(model, optimizer, batch, learning_rate(step, cfg.train.learning_rate, 0))
        now = time.perf_counter()  # step to step, as the Ray Train loop measures it
        rates.append(float(batch["attention_mask"].sum()) / (now - last))
        last = now
    return rates[warmup:]


def ray_train_loop(cfg: FinetuneConfig, model_path: str, state: StateDir, warmup: int):
    registry = Registry(state.default_tracking_uri(), state.mlflow_artifacts)
    with registry.run("bench", cfg.name, {}) as run_id:
        make_trainer(cfg, model_path, str(state.ray_storage), run_id, registry.tracking_uri).fit()
    history = registry.client.get_metric_history(run_id, "tokens_per_s")
    return [m.value for m in sorted(history, key=lambda m: m.step)][warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, tiny, or a model path")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the figures")
    args = parser.parse_args()

    model_path = StateDir.resolve(REPO / ".fedforge").base_model(args.model)
    rows = []
    plain = plain_loop(bench_config(args.model, args.steps, 1), model_path, args.warmup)
    rows.append(("plain peft loop (1 process)", 1, plain))
    # The machine's own ceiling for 2 CPUs: two independent plain loops at once share memory
    # bandwidth and caches just as two Ray Train workers do, with no Ray and no all-reduce.
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pair = pool.starmap(
            plain_loop, [(bench_config(args.model, args.steps, 1), model_path, args.warmup)] * 2
        )
    rows.append(("2 plain loops side by side", 2, [a + b for a, b in zip(*pair, strict=True)]))
    with tempfile.TemporaryDirectory() as tmp:
        state = StateDir.resolve(tmp)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            for workers in (1, 2):
                cfg = bench_config(args.model, args.steps, workers)
                rates = ray_train_loop(cfg, model_path, state, args.warmup)
                rows.append((f"Ray Train, {workers} worker(s)", workers, rates))
        finally:
            ray.shutdown()

    baseline = statistics.median(plain)
    cfg = bench_config(args.model, args.steps, 1)
    print(
        f"\nmodel {args.model}, batch {cfg.train.batch_size}/worker, max_length "
        f"{cfg.data.max_length}, LoRA r={cfg.lora.r} on {','.join(cfg.lora.target_modules)}, "
        f"{args.steps} steps ({args.warmup} warm-up left out), median per step"
    )
    print(
        f"| {'loop':<30} | {'CPUs':>4} | {'tokens/s':>9} | {'tokens/s per CPU':>16} "
        f"| {'vs plain, per CPU':>17} |"
    )
    print(f"|{'-' * 32}|{'-' * 6}|{'-' * 11}|{'-' * 18}|{'-' * 19}|")
    for name, cpus, rates in rows:
        median = statistics.median(rates)
        print(
            f"| {name:<30} | {cpus:>4} | {median:>9.0f} | {median / cpus:>16.0f} "
            f"| {median / cpus / baseline:>16.2f}x |"
        )


if __name__ == "__main__":
    main()
