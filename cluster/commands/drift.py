"""`fedforge drift report` and `fedforge drift retrain`: served traffic against training data.

`report` compares the prompt features the endpoint logged for a model (request_log with
`prompt_features: true`) over a window with the training profile registered beside the version
that answered them, and writes a PNG and a JSON verdict. `retrain` runs the same check and, on
drift, runs the fine-tune or federated job, which registers its result as `candidate`; nothing
is promoted: `fedforge registry gate` (or the demo) decides that. Both suit cron or a Ray job:

    0 * * * *  fedforge drift retrain --model support-bot --serve-config serve.yaml \\
                 --job finetune --config finetune.yaml --address http://head:8265

Exit codes of `report`: 0 no drift, 1 drift, 3 too little traffic for a verdict, 2 user error.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from cluster.commands.drift_stats import DriftResult, compare, plot
from cluster.commands.options import ConfigOpt, JobAddressOpt, StateOpt, TrackingOpt
from cluster.commands.registry import open_registry
from cluster.commands.requests import LogDirOpt, log_dir
from cluster.commands.retrain_guard import mark_started, only_retrain, within_cooldown
from cluster.core.config import load_config
from cluster.core.errors import UserError
from cluster.core.job_runner import run_module
from cluster.core.jobs import TRAINING_JOBS
from cluster.core.serve_config import DriftSettings, ServeConfig
from cluster.core.state import StateDir
from cluster.records.lineage import TRAINING_PROFILE_FILE
from cluster.records.prompt_features import PromptFeatures, read_profile
from cluster.records.registry import CANDIDATE, PRODUCTION, Registry
from cluster.records.request_log import parse_duration, parse_since, read_entries

DRIFT_EXIT, TOO_LITTLE_EXIT = 1, 3
RETRAINABLE = {job.name: job for job in TRAINING_JOBS}

drift_app = typer.Typer(
    help="Does served traffic still look like the training data? Retrain when not.",
    no_args_is_help=True,
)
ModelOpt = Annotated[str, typer.Option("--model", help="Registered model name, as served.")]
ServeConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--serve-config",
        help="The endpoint's serve config: its request_log.dir and drift settings (window, "
        "alpha, min_prompts). Default: those settings' defaults.",
    ),
]
SinceOpt = Annotated[
    str | None, typer.Option("--since", help="Window start: 30m, 24h, 7d or an ISO time.")
]
VersionOpt = Annotated[
    str | None,
    typer.Option(
        "--version",
        help="Compare with this version's training data (default: the version "
        "that answered most of the window).",
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="Report folder (default: <state dir>/reports/drift-...)."),
]


@dataclass(frozen=True)
class DriftCheck:
    model: str
    version: str
    since: datetime
    window: list[PromptFeatures]
    reference: list[PromptFeatures]
    settings: DriftSettings
    result: DriftResult | None  # None: too little traffic for a verdict

    def headline(self) -> str:
        since = f"{self.since:%F %T} UTC"
        scope = f"{self.model} v{self.version}, {len(self.window)} prompts since {since}"
        if self.result is None:
            return (
                f"{scope}: too little traffic for a verdict "
                f"(fewer than {self.settings.min_prompts} logged prompts with features)"
            )
        return f"{scope}: {self.result.summary()}"


def _settings(serve_config: Path | None) -> tuple[DriftSettings, str | None]:
    if serve_config is None:
        return DriftSettings(), None
    cfg = load_config(serve_config, ServeConfig)
    return cfg.drift, cfg.request_log.dir


def _reference(registry: Registry, model: str, version: str) -> list[PromptFeatures]:
    text = registry.read_optional(registry.get(model, version), TRAINING_PROFILE_FILE)
    if text is not None:
        try:
            return read_profile(text)
        except (ValueError, KeyError, TypeError):
            pass  # edited after registration: said below like a missing one
    raise UserError(
        f"{model} v{version} has no readable training profile ({TRAINING_PROFILE_FILE}): it was "
        "registered before fedforge recorded one, or the file was changed; compare with another "
        "version (--version) or retrain"
    )


def _features(answered: list) -> list[PromptFeatures]:
    """The entries' features; a malformed one (an edited log) is skipped and counted."""
    found, bad = [], 0
    for entry in answered:
        try:
            found.append(PromptFeatures.from_json(entry.features))
        except (KeyError, TypeError, ValueError):
            bad += 1
    if bad:
        typer.echo(f"skipped {bad} logged answers whose features are malformed", err=True)
    return found


def check_drift(
    registry: Registry,
    model: str,
    directory: Path,
    settings: DriftSettings,
    since: datetime,
    version: str | None = None,
) -> DriftCheck:
    answered = [
        e
        for e in read_entries(directory, since).entries
        if e.adapter == model and e.features is not None
    ]
    if version is None:
        if not answered:
            raise UserError(
                f"no answers of '{model}' with prompt features in {directory} since "
                f"{since:%F %T} UTC: turn on request_log.enabled and request_log.prompt_features "
                "in the serve config, or widen --since"
            )
        version = Counter(e.version for e in answered).most_common(1)[0][0]
    window = _features(answered)
    reference = _reference(registry, model, version)
    result = None
    if len(window) >= settings.min_prompts:
        try:
            result = compare(reference, window, settings.alpha, settings.permutations)
        except ValueError as exc:
            raise UserError(f"drift settings: {exc}") from None
    return DriftCheck(model, version, since, window, reference, settings, result)


def write_report(check: DriftCheck, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    body = {
        "model": check.model,
        "version": check.version,
        "since": check.since.isoformat(),
        "window_prompts": len(check.window),
        "reference_prompts": len(check.reference),
        "verdict": check.headline(),
        "result": check.result.to_json() if check.result else None,
    }
    (out / "drift.json").write_text(json.dumps(body, indent=2))
    if check.result is not None:
        title = f"{check.model} v{check.version}: served traffic vs training data\n"
        plot(check.result, check.reference, check.window, out / "drift.png", title)
    return out


def _table(result: DriftResult) -> str:
    header = ("feature", "statistic", "p-value", "PSI", "train", "served")
    lines = ["{:<22} {:>10} {:>9} {:>7} {:>9} {:>9}".format(*header)]
    for t in result.tests:
        flag = "  <- drift" if t.name in result.drifted else ""
        psi = f"{t.psi:.3f}" if t.psi is not None else "-"
        means = (
            f"{t.reference_mean:>9.3g} {t.window_mean:>9.3g}"
            if t.reference_mean is not None
            else f"{'-':>9} {'-':>9}"
        )
        lines.append(f"{t.name:<22} {t.statistic:>10.4g} {t.p_value:>9.3g} {psi:>7} {means}{flag}")
    return "\n".join(lines)


def _run_check(model, serve_config, since, version, log, tracking_uri, state_dir):
    settings, configured_dir = _settings(serve_config)
    directory = log_dir(log or (Path(configured_dir) if configured_dir else None), state_dir)
    registry = open_registry(tracking_uri, state_dir)
    try:
        start = parse_since(since or settings.window)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return registry, check_drift(registry, model, directory, settings, start, version)


def _default_out(state_dir, model: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return StateDir.resolve(state_dir).reports / f"drift-{model}-{stamp}"


@drift_app.command()
def report(
    model: ModelOpt,
    serve_config: ServeConfigOpt = None,
    since: SinceOpt = None,
    version: VersionOpt = None,
    out: OutOpt = None,
    log: LogDirOpt = None,
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Compare a window of served prompts with the served version's training prompts: a table,
    a PNG and a verdict (exit 1 on drift, 3 when the window is too small to tell)."""
    _, check = _run_check(model, serve_config, since, version, log, tracking_uri, state_dir)
    folder = write_report(check, out or _default_out(state_dir, model))
    if check.result is not None:
        typer.echo(_table(check.result))
    typer.echo(check.headline())
    typer.echo(f"report: {folder}")
    if check.result is None:
        raise typer.Exit(TOO_LITTLE_EXIT)
    if check.result.drift:
        raise typer.Exit(DRIFT_EXIT)


def pending_candidate(registry: Registry, model: str, cooldown: timedelta) -> str | None:
    """A `candidate` newer than production, registered within `cooldown`: retraining again
    before the gate judged it would only pile up candidates."""
    aliases = registry.aliases(model)
    candidate, production = aliases.get(CANDIDATE), aliases.get(PRODUCTION)
    if candidate is None or (production and int(candidate) <= int(production)):
        return None
    registered = next(
        (e for e in registry.history(model) if e.action == "register" and e.version == candidate),
        None,
    )
    if registered is None:
        return None
    age = datetime.now(UTC) - datetime.fromisoformat(registered.time)
    return candidate if age < cooldown else None


@drift_app.command()
def retrain(
    model: ModelOpt,
    config: ConfigOpt,
    job: Annotated[
        str, typer.Option("--job", help="finetune or federate: the job `--config` is for.")
    ] = "finetune",
    serve_config: ServeConfigOpt = None,
    since: SinceOpt = None,
    cooldown: Annotated[
        str,
        typer.Option(help="Skip while a candidate registered this recently awaits the gate."),
    ] = "24h",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would run; run nothing.")
    ] = False,
    log: LogDirOpt = None,
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
    address: JobAddressOpt = None,
) -> None:
    """On drift, run the training job (a Ray job with --address); its result is registered as
    `candidate` and promoted only by the gate. Exit 0 when nothing needed doing."""
    if job not in RETRAINABLE:
        raise UserError(f"--job must be one of {', '.join(RETRAINABLE)}, not '{job}'")
    module, config_type = RETRAINABLE[job].module, RETRAINABLE[job].config
    wait = parse_duration(cooldown)
    if wait is None:
        raise UserError(f"--cooldown '{cooldown}' is not a duration (30m, 24h, 7d)")
    job_config = load_config(config, config_type)
    if job_config.registry.model_name != model:
        raise UserError(
            f"{config} registers '{job_config.registry.model_name}', not '{model}': the new "
            "version must be a candidate of the model that drifted"
        )
    # The cooldown reads the registry the job will register in, not another one.
    job_store = job_config.registry.tracking_uri
    if tracking_uri and tracking_uri != job_store:
        raise UserError(
            f"--tracking-uri differs from {config}'s registry.tracking_uri: the job would register "
            "its candidate in another registry than the one checked (set it in the config only)"
        )
    tracking_uri = job_store
    registry, check = _run_check(model, serve_config, since, None, log, tracking_uri, state_dir)
    typer.echo(check.headline())
    if check.result is None or not check.result.drift:
        return
    write_report(check, _default_out(state_dir, model))
    if waiting := pending_candidate(registry, model, wait):
        typer.echo(f"not retraining: candidate v{waiting} awaits the gate (cooldown {cooldown})")
        return
    state = StateDir.resolve(state_dir)
    args = ["--config", str(config), "--state-dir", str(state.root)]
    with only_retrain(state, model) as mine:
        if not mine:
            typer.echo(f"not retraining: another retrain of '{model}' is running")
            return
        if started := within_cooldown(state, model, wait):
            typer.echo(
                f"not retraining: the last retrain of '{model}' started {started:%Y-%m-%d %H:%M}"
                f" UTC (cooldown {cooldown}, failed or not)"
            )
            return
        typer.echo(f"retraining: python -m {module} {' '.join(args)}")
        if not dry_run:
            mark_started(state, model)  # before the job: a failure counts against the cooldown
            run_module(module, *args, address=address)
