"""`fedforge privacy report NAME:VERSION`: the privacy budget a registered adapter spent.

Reads the privacy record a federated run writes into the adapter it registers, so the report
shows exactly what was registered: epsilon per client after every round, and the settings.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from cluster.errors import UserError
from cluster.jobs import run_local
from cluster.options import ConfigOpt, StateOpt, TrackingOpt
from cluster.privacy_record import PrivacyRecord
from cluster.registry_cli import open_registry
from cluster.state import StateDir

privacy_app = typer.Typer(help="Differential-privacy budgets of registered adapters.")


def _fmt(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def render_report(ref: str, record: PrivacyRecord) -> str:
    lines = [f"{ref}: {record.mode}"]
    if record.mode == "none":
        return lines[0] + " (no differential privacy)"
    lines[0] += (
        f", epsilon {_fmt(record.epsilon)} at delta {record.delta:g} "
        f"({record.accountant} accountant)"
    )
    lines.append(
        f"noise multiplier {record.noise_multiplier:.4g}, clipping norm "
        f"{record.max_grad_norm:g}, sample rate {record.sample_rate:.4g}, "
        f"{record.steps} steps per client"
    )
    # In-cluster clients by partition number, then outside ones (`outside-<node id>`).
    clients = sorted(
        {c for r in record.by_round for c in r.clients},
        key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else c),
    )
    header = f"{'round':>5}  {'epsilon (worst)':>15}" + "".join(
        f"  {'client ' + c:>10}" for c in clients
    )
    lines += ["", header]
    for r in record.by_round:
        cells = "".join(f"  {_fmt(r.clients.get(c)):>10}" for c in clients)
        lines.append(f"{r.round:>5}  {_fmt(r.worst):>15}{cells}")
    return "\n".join(lines)


@privacy_app.command()
def report(
    version: Annotated[
        str, typer.Argument(help="NAME:VERSION or NAME:ALIAS, e.g. fedforge-demo:2")
    ],
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Epsilon per client and per round of a registered federated adapter."""
    name, _, ref = version.rpartition(":")
    if not name:
        raise UserError("give NAME:VERSION (or NAME:ALIAS), e.g. fedforge-demo:2")
    registry = open_registry(tracking_uri, state_dir)
    with tempfile.TemporaryDirectory() as tmp:
        record = PrivacyRecord.read(registry.download(name, ref, Path(tmp)))
    if record is None:
        raise UserError(f"{version} has no privacy record (it was not trained federated)")
    typer.echo(render_report(version, record))


@privacy_app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def audit(ctx: typer.Context, config: ConfigOpt, state_dir: StateOpt = None) -> None:
    """Empirical check of a federated config's DP: a one-run canary audit (Steinke, Nasr and
    Jagielski, 2023) giving a lower bound on epsilon to compare with the reported one.

    Other options go to `python -m federated.audit` (--canaries, --guesses, --confidence,
    --client, --canary-lr, --other-steps, --seed); see docs/PRIVACY.md.
    """
    state = StateDir.resolve(state_dir)
    args = ["--config", str(config), "--state-dir", str(state.root), *ctx.args]
    code = run_local("federated.audit", args)
    if code:
        raise typer.Exit(code)
