"""`fedforge privacy report NAME:VERSION`: the privacy budget a registered adapter spent;
`fedforge privacy certificate NAME VERSION`: its guarantee and the evidence
(cluster/records/privacy_certificate.py); `fedforge privacy audit`: the canary audit of a config.

The report reads the privacy record a federated run writes into the adapter it registers, so it
shows exactly what was registered: epsilon per client after every round, and the settings.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from cluster.commands.options import ConfigOpt, ModelNameArg, StateOpt, TrackingOpt, VersionRefArg
from cluster.commands.registry import open_registry
from cluster.core.errors import UserError
from cluster.core.job_runner import run_local
from cluster.core.jobs import PRIVACY_AUDIT
from cluster.core.state import StateDir
from cluster.records import privacy_certificate
from cluster.records.privacy_record import PrivacyRecord

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


@privacy_app.command()
def certificate(
    name: ModelNameArg,
    ref: VersionRefArg,
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for the JSON and Markdown (default: <state>/reports)."),
    ] = None,
) -> None:
    """A version's privacy certificate: the guarantee in exact words, epsilon per data source
    over its ancestry against the model's budget, the sampling check, the release manifest
    checked against what the registry holds, the newest audit, and what is not covered."""
    state = StateDir.resolve(state_dir)
    cert = privacy_certificate.issue(open_registry(tracking_uri, state_dir), state, name, ref)
    json_path, md_path = privacy_certificate.write(cert, out or state.reports)
    typer.echo(privacy_certificate.render_markdown(cert))
    typer.echo(f"written: {md_path} and {json_path}")
    if cert.release_problems or cert.sampler.ok is False:
        raise typer.Exit(1)


@privacy_app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def audit(ctx: typer.Context, config: ConfigOpt, state_dir: StateOpt = None) -> None:
    """Empirical check of a federated config's DP: a one-run canary audit (Steinke, Nasr and
    Jagielski, 2023) giving a lower bound on epsilon to compare with the reported one.

    Other options go to `python -m federated.audit` (--canaries, --guesses, --confidence,
    --canary-lr, --two-sided, --plant-profile, --seed); see docs/PRIVACY.md.
    """
    state = StateDir.resolve(state_dir)
    args = ["--config", str(config), "--state-dir", str(state.root), *ctx.args]
    code = run_local(PRIVACY_AUDIT.module, args)
    if code:
        raise typer.Exit(code)
