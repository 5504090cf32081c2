"""End to end: the main job (`fedforge demo`) on the tiny profile, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.records.lineage import COMMUNICATION_METRIC
from cluster.records.privacy_record import PrivacyRecord
from cluster.records.registry import PRODUCTION, Registry
from cluster.records.release_manifest import check_registered, job_log_lines, round_fields, unlisted

pytestmark = [pytest.mark.slow, pytest.mark.integration]
REPO = Path(__file__).resolve().parents[1]
DEMO_PORTS = (8000, 8265, 9091, 9092, 9093)  # endpoint, dashboard, SuperLink


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_trains_federates_gates_serves_and_cleans_up(state, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "from cluster.commands.cli import main; main()", "demo", "--profile",
         "tiny", "--state-dir", str(state.root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "RAY_ADDRESS": ""},
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-3000:]
    stages = ("1/5: fine-tune", "2/5: federate", "3/5: gate", "4/5: verify", "5/5: serve")
    assert all(f"stage {stage}" in out for stage in stages), out[-3000:]
    assert "(from registry)" in out  # production evaluated after downloading it back
    # The OpenAI client got its answer from the registered adapter, named by its version.
    assert re.search(r"fedforge-tiny:\d+ answered:", out), out[-2000:]
    assert "demo finished in" in out

    registry = Registry(state.default_tracking_uri())
    fine, fed = registry.versions("fedforge-tiny")
    assert (fine.lineage.kind, fed.lineage.kind) == ("finetune", "federated")
    for version in (fine, fed):
        assert version.lineage.dataset_digest and version.lineage.config_sha256
        assert version.lineage.lora_rank == 8
    assert fed.lineage.privacy.epsilon > 0 and fed.lineage.privacy.delta == 1e-5
    assert fed.lineage.metrics[COMMUNICATION_METRIC] > 0  # adapter MB moved by the rounds
    # The gate: production is one of the two, the one with the better held-out accuracy.
    production = registry.aliases("fedforge-tiny")[PRODUCTION]
    accuracy = {v.version: v.lineage.metrics["eval_accuracy"] for v in (fine, fed)}
    assert accuracy[production] == max(accuracy.values())
    adapter = registry.download("fedforge-tiny", fed.version, tmp_path / "download")
    privacy = PrivacyRecord.read(adapter)
    assert privacy.by_round and privacy.epsilon == fed.lineage.privacy.epsilon
    # Privacy across features: the clients' examples keep their epsilon within the model's
    # budget (the central fine-tune's share is disjoint by content), and nothing the registry,
    # the round log or the federated job's log holds escapes the release manifest.
    assert registry.privacy_budget("fedforge-tiny") == 4.0
    [clients] = [p for p in fed.lineage.data_privacy.values() if p.private]
    assert clients.epsilon == pytest.approx(fed.lineage.privacy.epsilon)
    assert clients.versions == []  # no ancestor trained on any of these examples
    [central] = [p for p in fed.lineage.data_privacy.values() if not p.private]
    assert central.versions == [f"fedforge-tiny:{fine.version}"]
    assert check_registered(registry, fed) == []
    rounds = (state.root / "federated" / fed.lineage.run_name / "rounds.jsonl").read_text()
    fields = {f for line in rounds.splitlines() for f in round_fields(json.loads(line))}
    assert unlisted("round_field", fields, private=True) == []

    [report_dir] = (state.reports).glob("demo-*")
    job_log = (report_dir / "2-federate.log").read_text()
    assert unlisted("log_line", job_log_lines(job_log), private=True) == []
    for name in ("report.md", "training_loss.png", "federated.png", "latency.png"):
        assert (report_dir / name).stat().st_size > 0, name
    report_text = (report_dir / "report.md").read_text()
    assert "held-out accuracy" in report_text
    # Governance: each new version's model card and the model's alias history, linked and whole.
    for version in (fine, fed):
        card_file = f"model-card-fedforge-tiny-v{version.version}.md"
        assert f"]({card_file})" in report_text, card_file
        card = (report_dir / card_file).read_text()
        assert card.startswith(f"# Model card: `fedforge-tiny` v{version.version}")
        assert version.lineage.dataset_digest in card and "| base model |" in card
        assert "matches the logged sha256" in card and "- promotion gate: " in card
        assert "not judged by the gate" not in card
    fed_card = (report_dir / f"model-card-fedforge-tiny-v{fed.version}.md").read_text()
    assert f"| epsilon | {fed.lineage.privacy.epsilon:.4g} |" in fed_card
    certificate = f"privacy-certificate-fedforge-tiny-v{fed.version}.md"
    assert f"]({certificate})" in report_text
    assert "sampling confirmed, release manifest: nothing unlisted" in report_text
    assert "add/remove-one-example adjacency" in (report_dir / certificate).read_text()
    assert "](alias-history.md)" in report_text
    history = (report_dir / "alias-history.md").read_text()
    assert "`fedforge registry verify fedforge-tiny`: intact" in history
    assert f"promote v{production} production: - -> v{production}  reason: gate: promoted" in (
        history
    )
    assert registry.verify("fedforge-tiny").ok
    # Which version answered: the demo's last answer, audited from the endpoint's request log.
    assert "](answer-audit.md)" in report_text
    audit = (report_dir / "answer-audit.md").read_text()
    assert f"answered by fedforge-tiny:{production}" in audit
    assert "adapter digest matches the registered files" in audit
    assert f"promote v{production} production" in audit

    assert not [p for p in DEMO_PORTS if _listening(p)], "the demo left a port open"
    stray = subprocess.run(
        ["pgrep", "-f", "flower-super|flwr-|serve.deploy"], capture_output=True, text=True
    )
    assert stray.stdout == "", f"the demo left processes behind: {stray.stdout}"
