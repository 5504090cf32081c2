"""The README's promise that every command in it runs: each shell command in its code blocks is
matched to the test or script that runs it (a new command without one fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Command prefix -> (file that runs it, text in that file that shows it does).
RUN_BY = {
    "make demo": ("Makefile", "fedforge demo"),
    "make test": (".ci/run", "make test"),
    "ray start --head": ("scripts/local_cluster.sh", "ray start --head"),
    "ray job submit": ("tests/multinode/test_jobs_across_nodes.py", "submit_job("),
    "fedforge federate": ("tests/cluster/test_cli_state_dir.py", '"federate"'),
    "fedforge registry": ("tests/cluster/test_registry_cli.py", '"registry"'),
    "fedforge privacy certificate": ("tests/cluster/test_privacy_certificate.py", '"certificate"'),
    "python -m federated.certs node-key": ("tests/federated/test_secure_defaults.py", "node-key"),
    "flower-supernode": ("tests/federated/test_federation.py", '"flower-supernode"'),
    "fedforge serve": ("tests/cluster/test_cli_signals.py", '"serve"'),
    "scripts/local_cluster.sh": ("tests/multinode/conftest.py", "local_cluster.sh"),
    "fedforge demo": ("tests/multinode/test_jobs_across_nodes.py", '"--tracking-uri"'),
    "fedforge k8s generate": ("tests/cluster/test_k8s.py", '"generate"'),
}
NOT_COMMANDS = ("source ", "export ")  # shell set-up, not fedforge's


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            command = line.split("  #")[0].split(" # ")[0].strip()
            if command and not command.startswith(("#", *NOT_COMMANDS)):
                commands.append(" ".join(command.split()))
    return commands


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_is_run_by_a_test_or_script(command):
    prefix = next((p for p in RUN_BY if command.startswith(p)), None)
    assert prefix, f"README command with no test or script that runs it: {command}"
    where, evidence = RUN_BY[prefix]
    assert evidence in (REPO / where).read_text(), f"{where} no longer runs `{prefix}`"


def test_the_python_example_is_what_the_endpoint_test_does():
    text = (REPO / "README.md").read_text()
    assert "from openai import OpenAI" in text and "client.chat.completions.create(" in text
    endpoint_test = (REPO / "tests/serve/test_endpoint.py").read_text()
    assert "openai.OpenAI(base_url=" in endpoint_test
    assert "client.chat.completions.create(" in endpoint_test


def test_the_readme_stays_a_front_door():
    assert len((REPO / "README.md").read_bytes()) < 15_000
