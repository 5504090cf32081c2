"""Evaluate a registered adapter, downloaded back from the registry, against its base model.

    python -m llm.evaluate_registered --config configs/finetune/demo.yaml --ref candidate

Prints held-out accuracy and perplexity of base vs adapter and writes the numbers to
<state>/reports/<model>-v<version>-eval.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from cluster.core.config import FinetuneConfig, load_config
from cluster.core.entry import run_job
from cluster.core.state import StateDir
from cluster.records.registry import Registry
from llm.evaluate import evaluate_heldout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the fine-tuning config of the model")
    parser.add_argument("--ref", default="candidate", help="version number or alias")
    parser.add_argument("--state-dir", default=None)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, FinetuneConfig)
    state = StateDir.resolve(args.state_dir)
    registry = Registry.from_settings(cfg.registry, state)
    name = cfg.registry.model_name
    version = registry.get(name, args.ref)
    model_path = state.base_model(cfg.model.base)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = registry.download(name, version.version, Path(tmp))
        base = evaluate_heldout(cfg, model_path, None)
        tuned = evaluate_heldout(cfg, model_path, adapter_dir)
    rows = [("base model", base), (f"{name} v{version.version} (from registry)", tuned)]
    print(f"[fedforge] held-out evaluation on {tuned.examples} examples never trained on")
    print(f"[fedforge] {'model':<40} {'accuracy':>9} {'perplexity':>11} {'loss':>7}")
    for label, r in rows:
        print(f"[fedforge] {label:<40} {r.accuracy:>9.1%} {r.perplexity:>11.2f} {r.loss:>7.3f}")
    report = state.reports / f"{name}-v{version.version}-eval.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(
        json.dumps(
            {
                "model": name,
                "version": version.version,
                "examples": tuned.examples,
                "base": base.as_metrics(""),
                "adapter": tuned.as_metrics(""),
            },
            indent=2,
        )
    )
    print(f"[fedforge] report: {report}")
    return 0


if __name__ == "__main__":
    run_job(main)
