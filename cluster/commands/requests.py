"""`fedforge audit request ID`: which version answered a request, and what stood behind it.

Reads the endpoint's request log (cluster.records.request_log) for the answer, then the registry for
that version's lineage and the model's audit log (cluster.commands.request_audit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cluster.commands.options import StateOpt, TrackingOpt
from cluster.commands.registry import open_registry
from cluster.commands.request_audit import describe, find_answers
from cluster.core.errors import UserError
from cluster.core.state import StateDir

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
    found = find_answers(directory, request_id)
    if not found:
        raise UserError(
            f"no answer with id '{request_id}' in the request log at {directory} "
            "(is request_log.enabled on in the serve config, and is this the node that logged it?)"
        )
    registry = open_registry(tracking_uri, state_dir)
    for entry in found:  # a caller may reuse an X-Request-ID: show every answer under it
        typer.echo(describe(registry, entry))
