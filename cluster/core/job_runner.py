"""Running a job module: as a Ray job on a cluster, or as a local process with its own Ray head.

Both run the same command line (`python -m llm.finetune ...`), the one a user would give to
`ray job submit`.
"""

from __future__ import annotations

import asyncio
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable

import typer

from cluster.core.environment import GIT_REVISION_ENV, git_revision
from cluster.core.processes import exit_with_parent

TERMINAL_OK = "SUCCEEDED"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_local(module: str, args: list[str]) -> int:
    """Run `python -m module args` here, wait for it, and return its exit code.

    The job runs in its own process group and SIGINT/SIGTERM sent to this process are passed on
    to it once (a terminal's Ctrl-C would otherwise reach it twice and cut its clean-up short),
    so `kill <pid of fedforge>`, systemd, Docker and Kubernetes stop the job and everything it
    started (Ray head, Serve, vLLM), not just this wrapper.
    """
    job = subprocess.Popen(
        [sys.executable, "-m", module, *args], process_group=0, preexec_fn=exit_with_parent
    )

    def forward(signum, frame) -> None:
        job.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        return job.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def submit_job(
    client,
    module: str,
    args: list[str],
    env: dict[str, str] | None = None,
    python: str = "python",
) -> str:
    """Submit `python -m module args` with this directory as the job's working dir.

    `python` is the cluster's interpreter; a local head can be given this one (sys.executable),
    so jobs run in this environment even when it is not activated.
    """
    entrypoint = shlex.join([python, "-m", module, *args])
    # The uploaded working dir has no .git, so the revision travels as an env var.
    env_vars = {GIT_REVISION_ENV: git_revision(), **(env or {})}
    job_id = client.submit_job(
        entrypoint=entrypoint, runtime_env={"working_dir": ".", "env_vars": env_vars}
    )
    print(f"[fedforge] submitted Ray job {job_id}: {entrypoint}", flush=True)
    return job_id


def follow_job(client, job_id: str, on_text: Callable[[str], None]) -> bool:
    """Stream the job's log text to `on_text` until it ends; True if it succeeded."""

    async def follow() -> None:
        async for text in client.tail_job_logs(job_id):
            on_text(text)

    asyncio.run(follow())
    status = client.get_job_status(job_id)
    return str(status) == TERMINAL_OK or getattr(status, "value", "") == TERMINAL_OK


def submit_and_follow(address: str, module: str, args: list[str]) -> int:
    """Submit the module as a Ray job, stream its logs, and return 0 only if it succeeded."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = submit_job(client, module, args)
    ok = follow_job(client, job_id, lambda text: print(text, end="", flush=True))
    print(f"[fedforge] Ray job {job_id} {'SUCCEEDED' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


def run_module(module: str, *args: str, address: str | None = None) -> None:
    """Run `python -m module args...` (as a Ray job when a job address is given); a failed job
    ends the command with its exit code."""
    code = (
        submit_and_follow(address, module, list(args)) if address else run_local(module, list(args))
    )
    if code != 0:
        raise typer.Exit(code)
