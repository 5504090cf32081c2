"""LoRA fine-tuning on Ray Train, then evaluation and registration of the adapter.

    ray job submit --working-dir . -- python -m llm.finetune \
        --config configs/finetune/demo.yaml --state-dir "$PWD/.fedforge"

Submitting again with the same `name` resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from cluster.config import ConfigError, FinetuneConfig, load_config
from cluster.lineage import lineage_tags
from cluster.ray_cluster import connect
from cluster.registry import Registry
from cluster.state import StateDir
from llm.data import DatasetError, dataset_sha256, load_examples
from llm.evaluate import EvalResult, evaluate_heldout
from llm.model import ModelNotFoundError, resolve_model_path
from llm.run_identity import RunMismatchError, check_or_record, flatten
from llm.train_loop import ADAPTER_SUBDIR, make_trainer


@dataclass(frozen=True)
class FinetuneOutcome:
    version: str
    base: EvalResult
    tuned: EvalResult
    final_loss: float


def run_finetune(
    cfg: FinetuneConfig, state: StateDir, address: str | None = None
) -> FinetuneOutcome:
    model_path = resolve_model_path(cfg.model.base, state)
    load_examples(cfg.data.path)  # fail on a bad dataset before any Ray work
    check_or_record(cfg, state.ray_storage / cfg.name)
    # Ray Train workers do not run in the job's working directory: hand them absolute paths.
    worker_cfg = cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"path": str(Path(cfg.data.path).resolve())})}
    )
    connect(address)
    registry = Registry.from_settings(cfg.registry, state)
    params = {"config." + k: v for k, v in flatten(cfg.model_dump(mode="json")).items()}
    with registry.run(cfg.registry.experiment, cfg.name, params) as run_id:
        trainer = make_trainer(
            worker_cfg, model_path, str(state.ray_storage), run_id, registry.tracking_uri
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        final_loss = float((result.metrics or {}).get("loss", float("nan")))
        with result.checkpoint.as_directory() as ckpt_dir:
            adapter_dir = Path(ckpt_dir) / ADAPTER_SUBDIR
            print("[fedforge] evaluating base model and adapter on held-out examples", flush=True)
            base = evaluate_heldout(cfg, model_path, None)
            tuned = evaluate_heldout(cfg, model_path, adapter_dir)
            metrics = {**tuned.as_metrics(), "base_accuracy": base.accuracy, "loss": final_loss}
            registry.log_metrics(run_id, metrics)
            tags = lineage_tags(
                kind="finetune",
                config=cfg,
                base_model=cfg.model.base,
                dataset_sha256=dataset_sha256(cfg.data.path),
                metrics=metrics,
                extra={"run_name": cfg.name, "validation_examples": str(tuned.examples)},
            )
            version = registry.register_adapter(cfg.registry.model_name, adapter_dir, run_id, tags)
    return FinetuneOutcome(version.version, base, tuned, final_loss)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="LoRA fine-tuning on Ray Train")
    parser.add_argument(
        "--config", required=True, help="YAML file, e.g. configs/finetune/demo.yaml"
    )
    parser.add_argument("--state-dir", default=None, help="state directory (absolute in Ray jobs)")
    parser.add_argument(
        "--address", default=None, help="Ray address (default: $RAY_ADDRESS or local)"
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, FinetuneConfig)
        outcome = run_finetune(cfg, StateDir.resolve(args.state_dir), args.address)
    except (ConfigError, DatasetError, ModelNotFoundError, RunMismatchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"[fedforge] registered {cfg.registry.model_name} v{outcome.version} (alias candidate): "
        f"held-out accuracy base {outcome.base.accuracy:.1%} -> fine-tuned "
        f"{outcome.tuned.accuracy:.1%}, perplexity {outcome.base.perplexity:.1f} -> "
        f"{outcome.tuned.perplexity:.1f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
