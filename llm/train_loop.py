"""The Ray Train worker loop: LoRA fine-tuning, data-parallel over `num_workers` ranks.

Each rank sees a disjoint slice of every global batch. The data order is a pure function of
(seed, step), so a run resumed from a checkpoint at step k continues exactly where it stopped.
Only rank 0 prints, logs to MLflow and writes checkpoints.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from cluster.config import FinetuneConfig
from llm.data import collate, encode_example, load_examples, split_examples
from llm.lora import apply_lora, save_adapter
from llm.model import load_model, load_tokenizer

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
ADAPTER_SUBDIR = "adapter"

# Ray Train routes worker logging to `ray job logs` (rank 0 shown); a bare print shows twice.
log = logging.getLogger("fedforge.train")


def batch_indices(n_examples: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Indices of the global batch for `step`: epochs are seeded permutations laid end to end."""
    start = step * global_batch
    indices: list[int] = []
    while len(indices) < global_batch:
        epoch, offset = divmod(start + len(indices), n_examples)
        order = list(range(n_examples))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        indices += order[offset : offset + global_batch - len(indices)]
    return indices


def learning_rate(step: int, peak: float, warmup: int) -> float:
    return peak * min(1.0, (step + 1) / warmup) if warmup else peak


def _restore(model, optimizer, checkpoint: ray.train.Checkpoint) -> int:
    with checkpoint.as_directory() as ckpt_dir:
        ckpt = Path(ckpt_dir)
        weights = load_file(str(ckpt / ADAPTER_SUBDIR / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, weights)
        optimizer.load_state_dict(torch.load(ckpt / OPTIMIZER_FILE, weights_only=True))
        return json.loads((ckpt / STATE_FILE).read_text())["step"]


def _checkpoint(model, optimizer, step: int, metrics: dict, config: dict) -> ray.train.Checkpoint:
    ckpt_dir = Path(tempfile.mkdtemp(prefix="fedforge-ckpt-"))
    save_adapter(model, ckpt_dir / ADAPTER_SUBDIR)
    torch.save(optimizer.state_dict(), ckpt_dir / OPTIMIZER_FILE)
    (ckpt_dir / STATE_FILE).write_text(json.dumps({"step": step, **metrics}))
    (ckpt_dir / "config.json").write_text(json.dumps(config, indent=2))  # config travels along
    return ray.train.Checkpoint.from_directory(str(ckpt_dir))


def _mean_across_ranks(value: float) -> float:
    if not torch.distributed.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return tensor.item() / torch.distributed.get_world_size()


def train_worker(loop_config: dict) -> None:
    """Entry point of every Ray Train worker. `loop_config` is plain data (config + paths)."""
    cfg = FinetuneConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # per-report INFO lines are noise

    tokenizer = load_tokenizer(loop_config["model_path"])
    split = split_examples(
        load_examples(cfg.data.path), cfg.data.validation_fraction, cfg.data.split_seed
    )
    encoded = [
        encode_example(tokenizer, e, cfg.data.max_length, cfg.data.system_prompt)
        for e in split.train
    ]
    model = apply_lora(
        load_model(loop_config["model_path"], cfg.model.dtype), cfg.lora, cfg.train.seed
    )
    device = ray.train.torch.get_device()
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay
    )
    checkpoint = ray.train.get_checkpoint()
    start_step = _restore(model, optimizer, checkpoint) if checkpoint else 0
    if rank == 0 and start_step:
        log.info("[fedforge] resumed from checkpoint at step %d", start_step)
    peft_model = model
    model = ray.train.torch.prepare_model(model)  # DDP over gloo/nccl when world > 1

    mlflow = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        from mlflow import MlflowClient

        mlflow = MlflowClient(loop_config["tracking_uri"])

    global_batch = cfg.train.batch_size * world
    step = start_step
    if step >= cfg.train.max_steps:  # already finished: hand the final checkpoint back again
        ray.train.report({"step": step}, checkpoint=checkpoint if rank == 0 else None)
        return
    model.train()
    while step < cfg.train.max_steps:
        started = time.perf_counter()
        indices = batch_indices(len(encoded), step, global_batch, cfg.train.seed)
        mine = [encoded[i] for i in indices[rank * cfg.train.batch_size :][: cfg.train.batch_size]]
        batch = {k: v.to(device) for k, v in collate(mine, tokenizer.pad_token_id).items()}
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg.train.learning_rate, cfg.train.warmup_steps)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        elapsed = time.perf_counter() - started
        tokens = int(batch["attention_mask"].sum()) * world  # ranks' batches are similar sizes
        metrics = {
            "step": step,
            "loss": _mean_across_ranks(loss.item()),
            "tokens_per_s": tokens / elapsed,
            "lr": optimizer.param_groups[0]["lr"],
        }
        save_now = step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps
        new_checkpoint = None
        if rank == 0:
            log.info(
                "[fedforge] step %d/%d loss %.4f tokens/s %.0f lr %.2e",
                step,
                cfg.train.max_steps,
                metrics["loss"],
                metrics["tokens_per_s"],
                metrics["lr"],
            )
            if mlflow:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                mlflow.log_batch(
                    loop_config["mlflow_run_id"],
                    metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
                )
            if save_now:
                new_checkpoint = _checkpoint(
                    peft_model, optimizer, step, metrics, loop_config["config"]
                )
        ray.train.report(metrics, checkpoint=new_checkpoint)
        if new_checkpoint is not None:  # Ray Train has copied it into the run's storage
            shutil.rmtree(new_checkpoint.path, ignore_errors=True)
