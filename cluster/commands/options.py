"""The options and arguments `fedforge` commands share, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cluster.core.state import ENV_VAR

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML job config.")]
StateOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help=f"State directory (default: ${ENV_VAR}, else ./.fedforge).",
        show_default=False,
    ),
]
TrackingOpt = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow URI (default: the state dir's SQLite store)."),
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
ModelNameArg = Annotated[str, typer.Argument(help="Registered model name, e.g. fedforge-demo.")]
VersionRefArg = Annotated[str, typer.Argument(help="Version number or alias.")]
