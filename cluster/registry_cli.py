"""`fedforge registry ...`: list, show, promote and roll back adapter versions."""

from __future__ import annotations

from typing import Annotated

import typer

from cluster.config import RegistrySettings
from cluster.lineage import CONFIG_FILE
from cluster.options import ModelNameArg, StateOpt, TrackingOpt, VersionRefArg
from cluster.registry import PRODUCTION, Registry, VersionRecord
from cluster.state import StateDir

registry_app = typer.Typer(
    help="Registered adapter versions and their aliases.", no_args_is_help=True
)


def open_registry(tracking_uri: str | None, state_dir) -> Registry:
    return Registry.from_settings(
        RegistrySettings(tracking_uri=tracking_uri), StateDir.resolve(state_dir)
    )


def _summary_row(model: str, record: VersionRecord, aliases: dict[str, str]) -> str:
    lineage = record.lineage
    names = ",".join(sorted(a for a, v in aliases.items() if v == record.version)) or "-"

    def metric(name: str) -> str:
        value = lineage.metrics.get(name)
        return f"{value:.4g}" if value is not None else "-"

    return (
        f"{model:<20} {record.version:>4} {names:<22} {lineage.kind:<9} "
        f"{metric('eval_accuracy'):>6} {metric('base_accuracy'):>6} "
        f"{(lineage.dataset_sha256 or '-')[:12]:<12} {(lineage.git_revision or '-')[:12]:<12}"
    )


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
        for record in registry.versions(model):
            typer.echo(_summary_row(model, record, aliases))


@registry_app.command()
def show(
    name: ModelNameArg,
    ref: VersionRefArg,
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
    config: Annotated[
        bool, typer.Option("--config", help="Print the job config it was trained with.")
    ] = False,
) -> None:
    """Every lineage field of one version (as its MLflow tags)."""
    registry = open_registry(tracking_uri, state_dir)
    record = registry.get(name, ref)
    if config:
        typer.echo(registry.read_text(record, CONFIG_FILE), nl=False)
        return
    aliases = [a for a, v in registry.aliases(name).items() if v == record.version]
    typer.echo(f"{name} v{record.version}  aliases: {', '.join(aliases) or '-'}")
    typer.echo(f"source: {record.source}\nrun: {record.run_id}")
    for key, value in sorted(record.lineage.to_tags().items()):
        if "\n" in value:
            typer.echo(f"{key}:\n  " + value.rstrip().replace("\n", "\n  "))
        else:
            typer.echo(f"{key}: {value}")


@registry_app.command()
def promote(
    name: ModelNameArg,
    ref: VersionRefArg,
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Point `production` at a version."""
    record = open_registry(tracking_uri, state_dir).promote(name, ref)
    typer.echo(f"{name}: {PRODUCTION} -> v{record.version}")


@registry_app.command()
def rollback(
    name: ModelNameArg, tracking_uri: TrackingOpt = None, state_dir: StateOpt = None
) -> None:
    """Move `production` back to the version it pointed at before the last promote."""
    record, skipped = open_registry(tracking_uri, state_dir).rollback(name)
    gone = f"; skipped v{', v'.join(skipped)}: deleted" if skipped else ""
    typer.echo(f"{name}: {PRODUCTION} -> v{record.version} (rolled back{gone})")
