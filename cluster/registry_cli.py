"""`fedforge registry ...`: list, show, promote and roll back adapter versions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cluster.config import RegistrySettings
from cluster.registry import PRODUCTION, Registry, RegistryError
from cluster.state import StateDir

registry_app = typer.Typer(
    help="Registered adapter versions and their aliases.", no_args_is_help=True
)

NameArg = Annotated[str, typer.Argument(help="Registered model name, e.g. fedforge-demo.")]
TrackingOpt = Annotated[
    str | None, typer.Option("--tracking-uri", help="MLflow URI (default: the state dir's SQLite).")
]
StateOpt = Annotated[Path | None, typer.Option("--state-dir", help="State directory.")]
SUMMARY_TAGS = (
    "kind",
    "metric.eval_accuracy",
    "metric.base_accuracy",
    "dataset_sha256",
    "git_revision",
)


def open_registry(tracking_uri: str | None, state_dir: Path | None) -> Registry:
    return Registry.from_settings(
        RegistrySettings(tracking_uri=tracking_uri), StateDir.resolve(state_dir)
    )


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


@registry_app.command("list")
def list_versions(
    name: Annotated[str | None, typer.Argument(help="Model name (default: all).")] = None,
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Versions with their aliases and key lineage."""
    registry = open_registry(tracking_uri, state_dir)
    names = [name] if name else registry.model_names()
    if not names:
        typer.echo("no registered models yet")
        return
    typer.echo(
        f"{'model':<20} {'ver':>4} {'aliases':<22} {'kind':<9} {'acc':>6} {'base':>6} "
        f"{'dataset':<12} {'git':<12}"
    )
    for model in names:
        aliases = registry.aliases(model)
        for version in registry.versions(model):
            tags = {k.removeprefix("fedforge."): v for k, v in version.tags.items()}
            names_of = ",".join(sorted(a for a, v in aliases.items() if v == str(version.version)))
            kind, acc, base, data, rev = (tags.get(t, "-") for t in SUMMARY_TAGS)
            typer.echo(
                f"{model:<20} {version.version:>4} {names_of or '-':<22} {kind:<9} "
                f"{acc[:6]:>6} {base[:6]:>6} {data[:12]:<12} {rev[:12]:<12}"
            )


@registry_app.command()
def show(
    name: NameArg,
    ref: Annotated[str, typer.Argument(help="Version or alias.")],
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Every lineage tag of one version."""
    registry = open_registry(tracking_uri, state_dir)
    try:
        version = registry.get(name, ref)
    except RegistryError as exc:
        raise _fail(exc) from None
    aliases = [a for a, v in registry.aliases(name).items() if v == str(version.version)]
    typer.echo(f"{name} v{version.version}  aliases: {', '.join(aliases) or '-'}")
    typer.echo(f"source: {version.source}\nrun: {version.run_id}")
    for key, value in sorted(version.tags.items()):
        if "\n" in value:
            typer.echo(f"{key}:\n  " + value.rstrip().replace("\n", "\n  "))
        else:
            typer.echo(f"{key}: {value}")


@registry_app.command()
def promote(
    name: NameArg,
    ref: Annotated[str, typer.Argument(help="Version or alias.")],
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Point `production` at a version."""
    try:
        version = open_registry(tracking_uri, state_dir).promote(name, ref)
    except RegistryError as exc:
        raise _fail(exc) from None
    typer.echo(f"{name}: {PRODUCTION} -> v{version.version}")


@registry_app.command()
def rollback(name: NameArg, tracking_uri: TrackingOpt = None, state_dir: StateOpt = None) -> None:
    """Move `production` back to the version it pointed at before the last promote."""
    try:
        version = open_registry(tracking_uri, state_dir).rollback(name)
    except RegistryError as exc:
        raise _fail(exc) from None
    typer.echo(f"{name}: {PRODUCTION} -> v{version.version} (rolled back)")
