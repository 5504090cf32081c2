"""Deploy the OpenAI-compatible endpoint on Ray Serve and keep it up until stopped.

    ray job submit --working-dir . -- python -m serve.deploy \
        --config configs/serve/demo.yaml --state-dir "$PWD/.fedforge"

Also writes the equivalent Serve config file (for `serve deploy` or a KubeRay RayService)
with `--write-serve-config PATH` and exits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml
from ray import serve

from cluster.core.config import load_config
from cluster.core.entry import run_job
from cluster.core.errors import UserError
from cluster.core.ray_cluster import connect
from cluster.core.serve_config import ServeConfig
from cluster.core.state import StateDir
from serve.app import build_app


def serve_config_file(cfg: ServeConfig, config_path: str, state: StateDir) -> dict:
    """A Serve config (serve deploy / RayService) that builds the same app."""
    return {
        "http_options": {"host": cfg.http_host, "port": cfg.http_port},
        "applications": [
            {
                "name": cfg.name,
                "route_prefix": "/",
                "import_path": "serve.app:app_builder",
                "args": {"config": config_path, "state_dir": str(state.root)},
            }
        ],
    }


class DeployError(UserError):
    """The application failed to deploy; the message is Serve's reason."""


def deploy(cfg: ServeConfig, state: StateDir) -> str:
    """Start the app and return its base URL once every replica is ready."""
    started = time.monotonic()
    # Built first: a missing model or API key fails here, before Serve starts anything.
    app = build_app(cfg, state)
    serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port})
    serve.run(app, name=cfg.name, route_prefix="/", blocking=False)
    # serve.run returns once the ingress is up; the engine replicas may still be loading.
    while (status := serve.status().applications[cfg.name].status) != "RUNNING":
        if status == "DEPLOY_FAILED":
            raise DeployError(serve.status().applications[cfg.name].message)
        time.sleep(1)
    url = f"http://{cfg.http_host}:{cfg.http_port}/v1"
    print(f"[fedforge] endpoint ready at {url} in {time.monotonic() - started:.0f} s", flush=True)
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS)")
    parser.add_argument("--write-serve-config", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, ServeConfig)
    state = StateDir.resolve(args.state_dir)
    if args.write_serve_config:
        Path(args.write_serve_config).write_text(
            yaml.safe_dump(serve_config_file(cfg, args.config, state), sort_keys=False)
        )
        return 0
    state.base_model(cfg.model.base)  # a missing model fails now, before Ray starts
    connect(args.address, metrics_export_port=cfg.metrics_port)
    try:
        deploy(cfg, state)
        while True:  # serve until SIGINT or SIGTERM (KeyboardInterrupt)
            time.sleep(3600)
    finally:  # also after a failed deploy: no replica outlives this process
        serve.shutdown()


if __name__ == "__main__":
    run_job(main)
