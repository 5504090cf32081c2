"""`fedforge audit request ID`: which version answered a request, and what stood behind it.

Reads the endpoint's request log (cluster.request_log) for the answer, then the registry for
that version's lineage and the model's audit log for who had put it in production by then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cluster.audit_log import holder_at
from cluster.errors import UserError
from cluster.options import StateOpt, TrackingOpt
from cluster.registry import PRODUCTION, Registry, RegistryError
from cluster.registry_cli import open_registry
from cluster.request_log import AnsweredRequest, read_entries
from cluster.state import StateDir

audit_app = typer.Typer(help="Which model version answered which request.", no_args_is_help=True)
LogDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--log-dir",
        help="The endpoint's request log (default: <state dir>/serve/request-log; a serve "
        "config's request_log.dir when it sets one).",
        show_default=False,
    ),
]


def log_dir(explicit: Path | None, state_dir) -> Path:
    return explicit or StateDir.resolve(state_dir).request_log


def _answer_lines(entry: AnsweredRequest) -> list[str]:
    tokens = f"{entry.prompt_tokens} prompt + {entry.completion_tokens} completion tokens"
    return [
        f"request {entry.request_id}  (answer id {entry.response_id or '-'})",
        f"  time        {entry.time}  latency {entry.latency_ms:.0f} ms  "
        + ("streamed" if entry.stream else "whole")
        + ("" if entry.complete else ", CUT SHORT"),
        f"  caller      key id {entry.key_id or '(endpoint without keys)'}  {entry.route}",
        f"  asked for   {entry.model}",
        f"  answered by {entry.answered_by}  adapter sha256 {entry.adapter_sha256 or '-'}",
        f"  tokens      {tokens}",
    ]


def _version_lines(registry: Registry, entry: AnsweredRequest) -> list[str]:
    try:
        record = registry.get(entry.adapter, entry.version)
    except RegistryError as exc:
        return [f"  registry    {exc} (deleted since?)"]
    lineage = record.lineage
    digest = record.adapter_sha256
    if not digest or not entry.adapter_sha256:
        check = "not recorded on both sides"
    else:
        check = "matches the registered files" if digest == entry.adapter_sha256 else "DIFFERS"
    lines = [
        f"  version     {record.name} v{record.version} ({lineage.kind}, run "
        f"{lineage.run_name or record.run_id}), adapter digest {check}",
        f"  base model  {lineage.base_model}",
        f"  data        sha256 {lineage.dataset_sha256 or '-'}  ({lineage.dataset_bytes} bytes)",
    ]
    if lineage.privacy is not None and lineage.privacy.epsilon is not None:
        p = lineage.privacy
        lines.append(f"  this run    epsilon {p.epsilon:.4g} at delta {p.delta:g} ({p.mode})")
    for source, spent in sorted(lineage.data_privacy.items()):
        eps = "no DP" if spent.epsilon is None else f"epsilon {spent.epsilon:.4g}"
        lines.append(f"  privacy     {source}: {eps} composed over its ancestry")
    if entry.model == record.name:  # asked by alias: who had put this version there?
        moved = holder_at(registry.history(record.name), PRODUCTION, entry.timestamp)
        if moved is None:
            lines.append("  production  no logged move of production before this answer")
        else:
            same = "" if moved.new == record.version else f" (NOT v{record.version}: see verify)"
            lines.append(f"  production  {moved.line()}{same}")
    lines.append(f"  card        fedforge registry show {record.name} {record.version} --card")
    return lines


@audit_app.command()
def request(
    request_id: Annotated[
        str, typer.Argument(help="The answer's X-Request-ID header or its body's `id`.")
    ],
    log: LogDirOpt = None,
    tracking_uri: TrackingOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Which version answered the request: its adapter digest, data, epsilon, and who had put
    it in production by then."""
    directory = log_dir(log, state_dir)
    found = [
        e for e in read_entries(directory).entries if request_id in (e.request_id, e.response_id)
    ]
    if not found:
        raise UserError(
            f"no answer with id '{request_id}' in the request log at {directory} "
            "(is request_log.enabled on in the serve config, and is this the node that logged it?)"
        )
    registry = open_registry(tracking_uri, state_dir)
    for entry in found:  # a caller may reuse an X-Request-ID: show every answer under it
        lines = _answer_lines(entry)
        if entry.adapter:
            lines += _version_lines(registry, entry)
        else:
            lines.append("  base model  no adapter: the base model answered")
        typer.echo("\n".join(lines))
