"""The `fedforge` command line. It only wires commands: each job runs as its own module
(`python -m llm.finetune ...`), exactly what `ray job submit` runs, so both paths share code.

User errors (`cluster.core.errors.UserError`) from any command end as one `error: ...` line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer
from typer.core import TyperGroup

from cluster.commands.drift import drift_app
from cluster.commands.k8s import k8s_app
from cluster.commands.options import ConfigOpt, JobAddressOpt, StateOpt, TrackingOpt
from cluster.commands.privacy import privacy_app
from cluster.commands.registry import registry_app
from cluster.commands.requests import audit_app
from cluster.core.errors import UserError
from cluster.core.job_runner import run_module
from cluster.core.jobs import FEDERATE, FINETUNE, PROVISION, SERVE, Job
from cluster.core.state import StateDir

USER_ERROR_EXIT = 2


class _UserErrorBoundary(TyperGroup):
    """The root command group: every subcommand runs inside its `invoke`."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(USER_ERROR_EXIT) from None


app = typer.Typer(
    cls=_UserErrorBoundary,
    help="Fine-tune, federate and serve LLMs on a Ray cluster.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(registry_app, name="registry")
app.add_typer(privacy_app, name="privacy")
app.add_typer(k8s_app, name="k8s")
app.add_typer(audit_app, name="audit")
app.add_typer(drift_app, name="drift")


def _job(job: Job, config, state_dir, address: str | None) -> None:
    # Absolute, and resolved here (flag, else $FEDFORGE_STATE_DIR, else ./.fedforge): a Ray
    # job runs in a temporary copy of this directory and may not see this environment.
    state = StateDir.resolve(state_dir)
    run_module(job.module, "--config", str(config), "--state-dir", str(state.root), address=address)


@app.command()
def finetune(config: ConfigOpt, state_dir: StateOpt = None, address: JobAddressOpt = None) -> None:
    """LoRA fine-tuning on Ray Train; registers the adapter with alias `candidate`."""
    _job(FINETUNE, config, state_dir, address)


@app.command()
def federate(config: ConfigOpt, state_dir: StateOpt = None, address: JobAddressOpt = None) -> None:
    """Federated DP rounds (Flower on Ray); registers the adapter with alias `candidate`."""
    _job(FEDERATE, config, state_dir, address)


@app.command()
def serve(config: ConfigOpt, state_dir: StateOpt = None, address: JobAddressOpt = None) -> None:
    """The OpenAI-compatible endpoint (Ray Serve + vLLM); runs until stopped (SIGINT/SIGTERM)."""
    _job(SERVE, config, state_dir, address)


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
    tracking_uri: TrackingOpt = None,
) -> None:
    """The main job: fine-tune, federate with DP, gate, serve, and ask the served adapter.

    On a cluster (--address), give an MLflow server every node reaches (--tracking-uri)."""
    from cluster.commands.demo import PROFILES, run_demo

    if profile not in PROFILES:
        raise UserError(f"unknown profile '{profile}' (choose {', '.join(PROFILES)})")
    state = StateDir.resolve(state_dir)
    if profile != "gpu":  # the gpu profile names a hub model
        provision = ["--tiny"] if profile == "tiny" else []
        run_module(PROVISION.module, *provision, "--state-dir", str(state.root))
    code = run_demo(PROFILES[profile], state, keep_serving, address, tracking_uri)
    if code:
        raise typer.Exit(code)


def main() -> None:  # pragma: no cover - console script entry
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # MLflow draws a progress bar for every file it fetches (a card, a profile): noise here.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    app()
