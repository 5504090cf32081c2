"""Deploy the OpenAI-compatible endpoint on Ray Serve and keep it up until stopped.

    ray job submit --working-dir . -- python -m serve.deploy \
        --config configs/serve/demo.yaml --state-dir "$PWD/.fedforge"

Also writes the equivalent Serve config file (for `serve deploy` or a KubeRay RayService)
with `--write-serve-config PATH` and exits.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

import yaml
from ray import serve

from cluster.config import ConfigError, load_config
from cluster.ray_cluster import connect
from cluster.state import StateDir
from serve.api_keys import ApiKeyError
from serve.app import build_app
from cluster.serve_config import ServeConfig


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


class DeployError(RuntimeError):
    """The application failed to deploy; the message is Serve's reason."""


def deploy(cfg: ServeConfig, state: StateDir) -> str:
    """Start the app and return its base URL once every replica is ready."""
    serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port})
    started = time.monotonic()
    serve.run(build_app(cfg, state), name=cfg.name, route_prefix="/", blocking=False)
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
    try:
        cfg = load_config(args.config, ServeConfig)
        state = StateDir.resolve(args.state_dir)
        if args.write_serve_config:
            Path(args.write_serve_config).write_text(
                yaml.safe_dump(serve_config_file(cfg, args.config, state), sort_keys=False)
            )
            return 0
        connect(args.address, metrics_export_port=cfg.metrics_port)
        deploy(cfg, state)
    except (ConfigError, ApiKeyError, DeployError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
