"""One GPU, no Ray: LoRA fine-tuning steps through llm.training's own functions (the code every
Ray Train worker runs), timed. The first stage of scripts/gpu_check.sh: it fails within a
minute if the GPU path of the training code is broken, before a cluster is involved.

Reads a fine-tuning config (default the gpu profile's: bf16, LoRA r=16 on q/k/v/o) and trains
`--steps` steps of its batch on `--model` (a model directory; `--random-init` keeps the
architecture and draws fresh weights, for timing where the weights cannot be fetched). Prints
one table: step time, tokens/s, loss, peak GPU memory.

    python scripts/gpu_train_step.py --model .fedforge/models/demo [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.core.config import FinetuneConfig, load_config  # noqa: E402
from llm.model import load_tokenizer  # noqa: E402
from llm.training import (  # noqa: E402
    encoded_train_set,
    finetune_model_and_optimizer,
    learning_rate,
    rank_batch,
    train_step,
)


def random_copy(model_dir: str, dtype: str) -> str:
    """A model directory with `model_dir`'s architecture and tokenizer and random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tempfile.mkdtemp(prefix="fedforge-random-")
    config = AutoConfig.from_pretrained(model_dir)
    AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs/finetune/gpu.yaml"))
    parser.add_argument("--model", required=True, help="a model directory")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to try the script")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 1
    cfg = load_config(args.config, FinetuneConfig)
    data = cfg.data.model_copy(update={"path": str(REPO / cfg.data.path)})
    cfg = cfg.model_copy(update={"data": data})
    model_path = random_copy(args.model, cfg.model.dtype) if args.random_init else args.model
    tokenizer = load_tokenizer(model_path)
    encoded = encoded_train_set(cfg, tokenizer)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if on_gpu else lambda: None
    model, optimizer = finetune_model_and_optimizer(cfg, model_path, device)
    times, losses, tokens = [], [], 0
    for step in range(args.steps):
        batch = rank_batch(
            encoded, step, 0, 1, cfg.train.batch_size, cfg.train.seed, tokenizer.pad_token_id
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        sync()
        started = time.perf_counter()
        loss = train_step(model, optimizer, batch, learning_rate(step, 1e-3, 2))
        losses.append(loss.item())  # synchronises
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
            tokens += int(batch["attention_mask"].sum())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    where = torch.cuda.get_device_name() if on_gpu else "CPU"
    peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else float("nan")
    print(
        f"\n{where}, torch {torch.__version__}, {cfg.model.dtype}, "
        f"batch {cfg.train.batch_size} x <= {cfg.data.max_length} tokens, LoRA r={cfg.lora.r} "
        f"on {', '.join(cfg.lora.target_modules)} ({trainable / 1e6:.2f} M trainable)"
        + (", random weights" if args.random_init else "")
    )
    print(
        "| steps timed | step p50 ms | step max ms | tokens/s | loss first -> last | peak GPU MB |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {len(times)} | {statistics.median(times) * 1000:.1f} | {max(times) * 1000:.1f} | "
        f"{tokens / sum(times):.0f} | {losses[0]:.3f} -> {losses[-1]:.3f} | "
        f"{peak:.0f} |"
    )
    return 0 if all(loss == loss for loss in losses) else 1  # a NaN loss fails


if __name__ == "__main__":
    raise SystemExit(main())
