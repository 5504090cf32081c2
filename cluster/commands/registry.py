"""`fedforge registry ...`: list, show (with the model card), promote, roll back and delete
adapter versions; a model's privacy budget; the audit log's history and its verification."""

from __future__ import annotations

from typing import Annotated

import typer

from cluster.commands.gate import run_gate
from cluster.commands.options import ModelNameArg, StateOpt, TrackingOpt, VersionRefArg
from cluster.core.config import RegistrySettings
from cluster.core.errors import UserError
from cluster.core.state import StateDir
from cluster.records.lineage import CONFIG_FILE
from cluster.records.registry import PRODUCTION, Registry, VersionRecord

ReasonOpt = Annotated[
    str | None,
    typer.Option("--reason", help="Why: recorded in the model's audit log (history)."),
]

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
        f"{(lineage.dataset_digest or '-')[:12]:<12} {(lineage.git_revision or '-')[:12]:<12}"
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
    card: Annotated[
        bool,
        typer.Option("--card", help="Print its model card (Markdown) and what happened since."),
    ] = False,
) -> None:
    """Every lineage field of one version (as its MLflow tags)."""
    registry = open_registry(tracking_uri, state_dir)
    record = registry.get(name, ref)
    if card:
        typer.echo(registry.card(record), nl=False)
        return
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
    for line in spend_lines(record, registry.privacy_budget(name)):
        typer.echo(line)


def spend_lines(record: VersionRecord, budget: float | None) -> list[str]:
    """Per data source: what the version's ancestry spent against the model's budget."""
    lines = [
        f"privacy budget: epsilon {budget:g} per data source"
        if budget
        else "privacy budget: none set (`fedforge registry budget NAME EPSILON`)"
    ]
    for source, spent in sorted(record.lineage.data_privacy.items()):
        if not spent.private:
            used = "used without DP by design (no guarantee claimed; no budget applies)"
        elif spent.epsilon is None:
            used = "epsilon infinite: a run in its ancestry used it without DP"
        else:
            used = f"epsilon {spent.epsilon:.4g} at delta {spent.delta:g}"
        over = spent.over(budget) if budget else None
        verdict = "" if over is None else "  OVER BUDGET"
        lines.append(f"  spent of data {source}: {used}{verdict}")
    return lines


@registry_app.command()
def budget(
    name: ModelNameArg,
    epsilon: Annotated[float, typer.Argument(help="The epsilon no data source may pass.")],
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
    reason: ReasonOpt = None,
) -> None:
    """Set or change a model's privacy budget (audited): promote, rollback and the gate refuse
    a version whose ancestry spent more of any data source."""
    registry = open_registry(tracking_uri, state_dir)
    before = registry.privacy_budget(name)
    registry.set_privacy_budget(name, epsilon, reason=reason)
    typer.echo(f"{name}: privacy budget epsilon {before if before else '-'} -> {epsilon:g}")


@registry_app.command()
def promote(
    name: ModelNameArg,
    ref: VersionRefArg,
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
    reason: ReasonOpt = None,
) -> None:
    """Point `production` at a version."""
    record = open_registry(tracking_uri, state_dir).promote(name, ref, reason=reason)
    typer.echo(f"{name}: {PRODUCTION} -> v{record.version}")


@registry_app.command()
def gate(name: ModelNameArg, tracking_uri: TrackingOpt = None, state_dir: StateOpt = None) -> None:
    """The evaluation gate: promote the best version registered after production if it beats
    production on held-out accuracy within its privacy budgets (what the demo runs). Versions
    that held production before (rolled back from) are not judged again."""
    registry = open_registry(tracking_uri, state_dir)
    production = registry.aliases(name).get(PRODUCTION)
    served = {e.new for e in registry.history(name) if e.alias == PRODUCTION}
    newer = [
        v
        for v in registry.versions(name)
        if int(v.version) > int(production or 0) and v.version not in served
    ]
    if not newer:
        raise UserError(
            f"no version of '{name}' newer than production that has not served before, to judge"
        )
    typer.echo(f"gate: {run_gate(registry, name, newer).message}")


@registry_app.command()
def rollback(
    name: ModelNameArg,
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
    reason: ReasonOpt = None,
) -> None:
    """Move `production` back to the version it pointed at before the last promote."""
    record, skipped = open_registry(tracking_uri, state_dir).rollback(name, reason=reason)
    gone = f"; skipped v{', v'.join(skipped)}: deleted" if skipped else ""
    typer.echo(f"{name}: {PRODUCTION} -> v{record.version} (rolled back{gone})")


@registry_app.command()
def delete(
    name: ModelNameArg,
    version: Annotated[str, typer.Argument(help="Version number (not an alias).")],
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
    reason: ReasonOpt = None,
) -> None:
    """Delete a version that is not in production (its run's files and its log entries stay)."""
    aliases = open_registry(tracking_uri, state_dir).delete(name, version, reason=reason)
    dropped = f" (alias {', '.join(aliases)} removed with it)" if aliases else ""
    typer.echo(f"{name}: deleted v{version}{dropped}")


@registry_app.command()
def history(
    name: ModelNameArg, tracking_uri: TrackingOpt = None, state_dir: StateOpt = None
) -> None:
    """The model's audit log: every register, promote, rollback and delete, oldest first."""
    entries = open_registry(tracking_uri, state_dir).history(name)
    if not entries:
        typer.echo(f"no audit log entries for '{name}'")
    for entry in entries:
        typer.echo(entry.line())


@registry_app.command()
def verify(
    name: ModelNameArg,
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
    head: Annotated[
        str | None,
        typer.Option("--head", help="A head sha256 recorded earlier: it must still be in the log."),
    ] = None,
) -> None:
    """Check the audit log's hash chain; exit 1 naming the first bad entry."""
    check = open_registry(tracking_uri, state_dir).verify(name, anchor=head)
    if not check.ok:
        typer.echo(f"audit log of '{name}' FAILED verification: {check.problems[0]}", err=True)
        raise typer.Exit(1)
    typer.echo(
        f"audit log of '{name}' intact: {check.entries} entries, head sha256 {check.head_sha256}"
    )
