"""The `fedforge` command line. It only wires commands: each job runs as its own module
(`python -m llm.finetune ...`), exactly what `ray job submit` runs, so both paths share code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cluster.jobs import run_local, submit_and_follow
from cluster.privacy_cli import privacy_app
from cluster.registry_cli import registry_app

app = typer.Typer(
    help="Fine-tune, federate and serve LLMs on a Ray cluster.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(registry_app, name="registry")
app.add_typer(privacy_app, name="privacy")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML job config.")]
StateOpt = Annotated[
    Path | None, typer.Option("--state-dir", help="State directory (default ./.fedforge).")
]
JobAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        envvar="RAY_JOB_ADDRESS",
        help="Ray dashboard address (http://head:8265): submit as a Ray job. "
        "Default: run here with a local Ray head.",
    ),
]


def run_module(module: str, *args: str, address: str | None = None) -> None:
    """Run `python -m module args...` (as a Ray job when a job address is given)."""
    code = (
        submit_and_follow(address, module, list(args)) if address else run_local(module, list(args))
    )
    if code != 0:
        raise typer.Exit(code)


def _state_args(state_dir: Path | None) -> list[str]:
    return ["--state-dir", str(state_dir.resolve())] if state_dir else []


@app.command()
def finetune(config: ConfigOpt, state_dir: StateOpt = None, address: JobAddressOpt = None) -> None:
    """LoRA fine-tuning on Ray Train; registers the adapter with alias `candidate`."""
    state = state_dir or Path(".fedforge")  # absolute: a Ray job runs in a temporary copy
    run_module("llm.finetune", "--config", str(config), *_state_args(state), address=address)


@app.command()
def federate(config: ConfigOpt, state_dir: StateOpt = None, address: JobAddressOpt = None) -> None:
    """Federated DP rounds (Flower on Ray); registers the adapter with alias `candidate`."""
    state = state_dir or Path(".fedforge")
    run_module("federated.run", "--config", str(config), *_state_args(state), address=address)


@app.command()
def serve(config: ConfigOpt, state_dir: StateOpt = None, address: JobAddressOpt = None) -> None:
    """The OpenAI-compatible endpoint (Ray Serve + vLLM); runs until stopped."""
    state = state_dir or Path(".fedforge")
    run_module("serve.deploy", "--config", str(config), *_state_args(state), address=address)


@app.command()
def demo(
    profile: Annotated[
        str,
        typer.Option(help="demo (SmolLM2-135M, < 20 min on 2 cores), tiny (tests), gpu (cluster)."),
    ] = "demo",
    state_dir: StateOpt = None,
    keep_serving: Annotated[
        bool, typer.Option("--keep-serving", help="Keep the endpoint up after the demo.")
    ] = False,
    address: JobAddressOpt = None,
) -> None:
    """The main job: fine-tune, federate with DP, gate, serve, and ask the served adapter."""
    from cluster.demo import PROFILES, run_demo
    from cluster.state import StateDir

    if profile not in PROFILES:
        typer.echo(f"error: unknown profile '{profile}' (choose {', '.join(PROFILES)})", err=True)
        raise typer.Exit(2)
    if profile != "gpu":  # the gpu profile names a hub model
        provision = ["--tiny"] if profile == "tiny" else []
        run_module("llm.demo_model", *provision, *_state_args(state_dir))
    code = run_demo(profile, StateDir.resolve(state_dir), keep_serving, address)
    if code:
        raise typer.Exit(code)


def main() -> None:  # pragma: no cover - console script entry
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
