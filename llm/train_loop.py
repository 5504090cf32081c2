"""The Ray Train worker loop: LoRA fine-tuning, data-parallel over `num_workers` ranks.

Each rank sees a disjoint slice of every global batch. The data order is a pure function of
(seed, step), so a run resumed from a checkpoint at step k continues exactly where it stopped.
Only rank 0 prints, logs to MLflow and writes checkpoints.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from mlflow import MlflowClient, flush_async_logging, set_tracking_uri
from mlflow.entities import Metric
from peft import set_peft_model_state_dict
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file

from cluster.core.config import FinetuneConfig
from llm.lora import save_adapter
from llm.model import load_tokenizer
from llm.training import (
    encoded_train_set,
    finetune_model_and_optimizer,
    learning_rate,
    rank_batch,
    train_step,
)

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
ADAPTER_SUBDIR = "adapter"

# Ray Train routes worker logging to `ray job logs` (rank 0 shown); a bare print shows twice.
log = logging.getLogger("fedforge.train")


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


def _sum_across_ranks(*values: float) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def train_worker(loop_config: dict) -> None:
    """Entry point of every Ray Train worker. `loop_config` is plain data (config + paths)."""
    cfg = FinetuneConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # per-report INFO lines are noise

    tokenizer = load_tokenizer(loop_config["model_path"])
    encoded = encoded_train_set(cfg, tokenizer)
    device = ray.train.torch.get_device()
    model, optimizer = finetune_model_and_optimizer(cfg, loop_config["model_path"], device)
    checkpoint = ray.train.get_checkpoint()
    start_step = _restore(model, optimizer, checkpoint) if checkpoint else 0
    if rank == 0 and start_step:
        log.info("[fedforge] resumed from checkpoint at step %d", start_step)
    peft_model = model
    # DDP over gloo/nccl when world > 1. Buffers (rotary tables) are identical on every rank:
    # broadcasting them before each forward is a wasted collective per step.
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"broadcast_buffers": False}
    )

    mlflow = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        mlflow = MlflowClient(loop_config["tracking_uri"])

    step = start_step
    if step >= cfg.train.max_steps:  # already finished: hand the final checkpoint back again
        ray.train.report({"step": step}, checkpoint=checkpoint if rank == 0 else None)
        return
    model.train()
    last = time.perf_counter()
    while step < cfg.train.max_steps:
        batch = rank_batch(
            encoded,
            step,
            rank,
            world,
            cfg.train.batch_size,
            cfg.train.seed,
            tokenizer.pad_token_id,
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        lr = learning_rate(step, cfg.train.learning_rate, cfg.train.warmup_steps)
        loss = train_step(model, optimizer, batch, lr)
        step += 1
        loss_sum, tokens = _sum_across_ranks(loss.item(), float(batch["attention_mask"].sum()))
        # Wall time since the previous step ended: includes reporting and checkpoint overhead.
        now = time.perf_counter()
        metrics = {
            "step": step,
            "loss": loss_sum / world,
            "tokens_per_s": tokens / (now - last),
            "lr": lr,
        }
        last = now
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
                timestamp_ms = int(time.time() * 1000)
                mlflow.log_batch(
                    loop_config["mlflow_run_id"],
                    metrics=[Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items()],
                    synchronous=False,  # off the critical path: the other ranks wait for rank 0
                )
            if save_now:
                new_checkpoint = _checkpoint(
                    peft_model, optimizer, step, metrics, loop_config["config"]
                )
        if save_now or step % cfg.train.report_every == 0:
            ray.train.report(metrics, checkpoint=new_checkpoint)
        if new_checkpoint is not None:  # Ray Train has copied it into the run's storage
            shutil.rmtree(new_checkpoint.path, ignore_errors=True)
    if mlflow:
        # The worker process ends with this function. flush_async_logging() flushes the store
        # of the fluent API's tracking URI (stores are cached per URI): point it at the run's,
        # or it opens a default ./mlflow.db and the client's queue is never flushed.
        set_tracking_uri(loop_config["tracking_uri"])
        flush_async_logging()


def make_trainer(
    cfg: FinetuneConfig, model_path: str, storage_path: str, mlflow_run_id: str, tracking_uri: str
) -> TorchTrainer:
    """The TorchTrainer for `cfg`: its workers, storage, checkpoint retention and retries.

    `cfg.data.path` must be absolute: Ray Train workers do not run in the job's directory.
    """
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "model_path": model_path,
            "mlflow_run_id": mlflow_run_id,
            "tracking_uri": tracking_uri,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
        ),
    )
