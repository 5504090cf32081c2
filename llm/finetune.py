"""LoRA fine-tuning on Ray Train, then evaluation and registration of the adapter.

    ray job submit --working-dir . -- python -m llm.finetune \
        --config configs/finetune/demo.yaml --state-dir "$PWD/.fedforge"

Submitting again with the same `name` resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cluster.core.config import FinetuneConfig, load_config
from cluster.core.entry import run_job
from cluster.core.example_ids import ExampleKey
from cluster.core.ray_cluster import connect
from cluster.core.state import StateDir
from cluster.records.registry import Registry
from llm.data import dataset_sha256, load_examples
from llm.publish import Published, publish_adapter, tracked_run
from llm.run_identity import check_or_record
from llm.train_loop import ADAPTER_SUBDIR, make_trainer


def run_finetune(cfg: FinetuneConfig, state: StateDir, address: str | None = None) -> Published:
    model_path = state.base_model(cfg.model.base)
    load_examples(cfg.data.path)  # fail on a bad dataset before any Ray work
    check_or_record(cfg, state.ray_storage / cfg.name, data=dataset_sha256(cfg.data.path))
    # Ray Train workers do not run in the job's working directory: hand them absolute paths.
    worker_cfg = cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"path": str(Path(cfg.data.path).resolve())})}
    )
    connect(address)
    registry = Registry.from_settings(cfg.registry, state)
    with tracked_run(registry, cfg) as run_id:
        trainer = make_trainer(
            worker_cfg, model_path, str(state.ray_storage), run_id, registry.tracking_uri
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        final_loss = float((result.metrics or {}).get("loss", float("nan")))
        with result.checkpoint.as_directory() as ckpt_dir:
            return publish_adapter(
                registry,
                run_id,
                cfg,
                model_path,
                Path(ckpt_dir) / ADAPTER_SUBDIR,
                kind="finetune",
                key=ExampleKey.of(state),
                metrics={"loss": final_loss},
            )


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
    cfg = load_config(args.config, FinetuneConfig)
    outcome = run_finetune(cfg, StateDir.resolve(args.state_dir), args.address)
    print(
        f"[fedforge] registered {cfg.registry.model_name} v{outcome.version.version} (alias "
        f"candidate): held-out accuracy base {outcome.base.accuracy:.1%} -> fine-tuned "
        f"{outcome.tuned.accuracy:.1%}, perplexity {outcome.base.perplexity:.1f} -> "
        f"{outcome.tuned.perplexity:.1f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    run_job(main)
