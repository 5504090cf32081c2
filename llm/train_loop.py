"""The Ray Train worker loop: LoRA fine-tuning, data-parallel over `num_workers` ranks.

Each rank sees a disjoint slice of every global batch. The data order is a pure function of
(seed, step), so a run resumed from a checkpoint at step k continues exactly where it stopped.
Every rank reports to Ray Train; only rank 0 prints, logs to MLflow and writes checkpoints.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
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


def train_worker(loop_config: dict) -> None:
    """Entry point of every Ray Train worker. `loop_config` is plain data (config + paths)."""
    cfg = FinetuneConfig.model_validate(loop_config["config"])
    rank, world = _set_up_worker(cfg)
    tokenizer = load_tokenizer(loop_config["model_path"])
    encoded = encoded_train_set(cfg, tokenizer)
    device = ray.train.torch.get_device()
    peft_model, optimizer = finetune_model_and_optimizer(cfg, loop_config["model_path"], device)
    checkpoint = ray.train.get_checkpoint()
    start_step = _resume(peft_model, optimizer, checkpoint, rank)
    model = _data_parallel(peft_model)
    mlflow = _MlflowRun.for_rank(rank, loop_config)
    if start_step >= cfg.train.max_steps:  # already finished: hand the final checkpoint back again
        ray.train.report({"step": start_step}, checkpoint=checkpoint if rank == 0 else None)
        return

    timer = _StepTimer()
    for step in range(start_step, cfg.train.max_steps):
        batch = rank_batch(
            encoded, step, rank, world, cfg.train.batch_size, cfg.train.seed, tokenizer.pad_token_id
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        lr = learning_rate(step, cfg.train.learning_rate, cfg.train.warmup_steps)
        loss = train_step(model, optimizer, batch, lr)
        done = step + 1
        metrics = _step_metrics(done, loss, batch, lr, world, timer)
        if rank == 0:
            _log_progress(metrics, cfg.train.max_steps)
            if mlflow:
                mlflow.log(metrics, done)
        _maybe_report(cfg, rank, done, metrics, peft_model, optimizer)
    if mlflow:
        mlflow.flush()


def _set_up_worker(cfg: FinetuneConfig) -> tuple[int, int]:
    """This worker's (rank, world size); torch threads and Ray Train's log level set for it."""
    context = ray.train.get_context()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # per-report INFO lines are noise
    return context.get_world_rank(), context.get_world_size()


def _resume(model, optimizer, checkpoint: ray.train.Checkpoint | None, rank: int) -> int:
    """The step to start from: the checkpoint's, its adapter and optimizer state loaded; else 0."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as ckpt_dir:
        ckpt = Path(ckpt_dir)
        weights = load_file(str(ckpt / ADAPTER_SUBDIR / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, weights)
        optimizer.load_state_dict(torch.load(ckpt / OPTIMIZER_FILE, weights_only=True))
        step = json.loads((ckpt / STATE_FILE).read_text())["step"]
    if rank == 0:
        log.info("[fedforge] resumed from checkpoint at step %d", step)
    return step


def _data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """DDP over gloo/nccl when world > 1 (Ray Train's prepare_model)."""
    # Buffers (rotary tables) are identical on every rank: broadcasting them before each
    # forward is a wasted collective per step.
    return ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"broadcast_buffers": False}
    )


class _StepTimer:
    """Wall time between the ends of consecutive steps: reporting and checkpoints included."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        return seconds


def _step_metrics(
    step: int, loss: torch.Tensor, batch: dict, lr: float, world: int, timer: _StepTimer
) -> dict[str, float]:
    """The step's metrics over all ranks: mean loss, tokens/s of the whole group, learning rate.

    A collective: every rank calls it every step.
    """
    loss_sum, tokens = _sum_across_ranks(loss.item(), float(batch["attention_mask"].sum()))
    return {"step": step, "loss": loss_sum / world, "tokens_per_s": tokens / timer.lap(), "lr": lr}


def _sum_across_ranks(*values: float) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _log_progress(metrics: dict[str, float], max_steps: int) -> None:
    log.info(
        "[fedforge] step %d/%d loss %.4f tokens/s %.0f lr %.2e",
        metrics["step"],
        max_steps,
        metrics["loss"],
        metrics["tokens_per_s"],
        metrics["lr"],
    )


@dataclass(frozen=True)
class _MlflowRun:
    """The job's MLflow run, which rank 0 alone writes the step metrics to."""

    client: MlflowClient
    run_id: str
    tracking_uri: str

    @classmethod
    def for_rank(cls, rank: int, loop_config: dict) -> _MlflowRun | None:
        if rank != 0 or not loop_config.get("mlflow_run_id"):
            return None
        uri = loop_config["tracking_uri"]
        return cls(MlflowClient(uri), loop_config["mlflow_run_id"], uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        timestamp_ms = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items()],
            synchronous=False,  # off the critical path: the other ranks wait for rank 0
        )

    def flush(self) -> None:
        # The worker process ends with train_worker. flush_async_logging() flushes the store
        # of the fluent API's tracking URI (stores are cached per URI): point it at the run's,
        # or it opens a default ./mlflow.db and the client's queue is never flushed.
        set_tracking_uri(self.tracking_uri)
        flush_async_logging()


def _maybe_report(
    cfg: FinetuneConfig, rank: int, step: int, metrics: dict, model, optimizer
) -> None:
    """Report to Ray Train every `report_every` steps, with a checkpoint (rank 0's) every
    `checkpoint_every` steps and at the last. Every rank reports, or the group waits forever."""
    save_now = step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps
    if not save_now and step % cfg.train.report_every:
        return
    checkpoint = (
        _checkpoint(model, optimizer, step, metrics, cfg) if save_now and rank == 0 else None
    )
    ray.train.report(metrics, checkpoint=checkpoint)
    if checkpoint is not None:  # Ray Train has copied it into the run's storage
        shutil.rmtree(checkpoint.path, ignore_errors=True)


def _checkpoint(
    model, optimizer, step: int, metrics: dict, cfg: FinetuneConfig
) -> ray.train.Checkpoint:
    ckpt_dir = Path(tempfile.mkdtemp(prefix="fedforge-ckpt-"))
    save_adapter(model, ckpt_dir / ADAPTER_SUBDIR)
    torch.save(optimizer.state_dict(), ckpt_dir / OPTIMIZER_FILE)
    (ckpt_dir / STATE_FILE).write_text(json.dumps({"step": step, **metrics}))
    config = cfg.model_dump(mode="json")  # the config travels with the weights
    (ckpt_dir / "config.json").write_text(json.dumps(config, indent=2))
    return ray.train.Checkpoint.from_directory(str(ckpt_dir))


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
