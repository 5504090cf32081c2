"""Running a job module: as a Ray job on a cluster, or as a local process with its own Ray head.

Both run the same command line (`python -m llm.finetune --config ...`), the one a user would
give to `ray job submit`.
"""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import sys

from cluster.lineage import GIT_REVISION_ENV, git_revision

TERMINAL_OK = "SUCCEEDED"


def run_local(module: str, args: list[str]) -> int:
    """Run the module in a child process; it starts (and stops) a local Ray head itself."""
    return subprocess.call([sys.executable, "-m", module, *args])


def submit_and_follow(address: str, module: str, args: list[str]) -> int:
    """Submit `python -m module args` as a Ray job with this directory as its working dir,
    stream its logs until it ends, and return 0 only if it succeeded."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    entrypoint = shlex.join(["python", "-m", module, *args])
    # The uploaded working dir has no .git, so the revision travels as an env var.
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": ".", "env_vars": {GIT_REVISION_ENV: git_revision()}},
    )
    print(f"[fedforge] submitted Ray job {job_id}: {entrypoint}", flush=True)

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    status = client.get_job_status(job_id)
    print(f"[fedforge] Ray job {job_id} {status}", flush=True)
    return 0 if str(status) == TERMINAL_OK or getattr(status, "value", "") == TERMINAL_OK else 1
