"""`fedforge privacy certificate`: the guarantee, spend against the model's budget, the sampling
check against the run's own round log, the manifest check and the newest audit, as a user
reads them; a certificate whose evidence fails says so and exits 1."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from cluster.commands.cli import app
from cluster.core.config import dump_config, load_config
from cluster.core.federated_config import FederatedConfig
from cluster.records.lineage import CONFIG_FILE, Lineage
from cluster.records.privacy_record import ClientCharge, DataPrivacy, PrivacyRecord, RoundPrivacy
from tests.federated.tiny_config import TINY

RATE = 1 / 41  # 162 examples in batches of 4


def register(registry, stub_adapter, tmp_path):
    adapter = tmp_path / "dp-adapter"
    shutil.copytree(stub_adapter, adapter)
    charges = [ClientCharge(attempt=1, round=1, noise=1.0, rate=RATE, steps=2)]
    PrivacyRecord(
        mode="local_dp", epsilon=1.2, delta=1e-5, accountant="rdp", histories={"0": charges},
        by_round=[RoundPrivacy(round=1, epsilon=1.2, clients={"0": 1.2})],
    ).write(adapter)  # fmt: skip
    spent = {
        "ab12/clients": DataPrivacy(epsilon=1.2, delta=1e-5),
        "ab12/central": DataPrivacy(epsilon=None, private=False),
    }
    lineage = Lineage(
        kind="federated", base_model="tiny", run_name="cert-run", data_privacy=spent,
        privacy=PrivacyRecord.read(adapter).budget,
    )  # fmt: skip
    config = dump_config(load_config(TINY, FederatedConfig))
    with registry.run("cert", "cert-run", {}) as run_id:
        return registry.register_adapter(
            "m", adapter, run_id, lineage, files={CONFIG_FILE: config}, privacy_budget=3.0
        )


def round_log(state, examples: int) -> None:
    run = state.root / "federated" / "cert-run"
    run.mkdir(parents=True)
    client = {"num_examples": examples, "partition": 0, "steps": 2, "epsilon": 1.2}
    line = {"round": 1, "clients": 1, "epsilon": 1.2, "per_client": {"7": client}}
    (run / "rounds.jsonl").write_text(json.dumps(line) + "\n")


def certify(state):
    return CliRunner().invoke(
        app, ["privacy", "certificate", "m", "1", "--state-dir", str(state.root)]
    )


def test_the_certificate_states_the_guarantee_and_confirms_what_it_can(
    registry, empty_state, stub_adapter, tmp_path
):
    register(registry, stub_adapter, tmp_path)
    round_log(empty_state, examples=162)
    audit = {"run": "cert-run-audit-1", "date": "20261203T120000Z", "mode": "local_dp",
             "reported_epsilon": 1.2, "lower_bound": 0.4, "ceiling": 4.1, "canaries": 1000,
             "guesses": 250, "confidence": 0.95}  # fmt: skip
    empty_state.reports.mkdir(parents=True)
    (empty_state.reports / "audit-cert-run-audit-1.json").write_text(json.dumps(audit))
    result = certify(empty_state)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "add/remove-one-example adjacency" in text and "accountant `rdp`" in text
    assert "| ab12/clients | yes | 1.2 | 1e-05 | 3 (within) | - |" in text
    assert "| ab12/central | no | no DP by design |" in text
    assert "Poisson sampling (each example drawn independently): confirmed." in text
    assert "checked against it now: nothing unlisted." in text
    assert "epsilon lower bound 0.400 (ceiling 4.100) against a reported 1.2" in text
    written = json.loads((empty_state.reports / "privacy-certificate-m-v1.json").read_text())
    assert written["sampler"]["ok"] and written["manifest_sha256"] in text
    card = registry.card(registry.get("m", "1"))
    assert "`fedforge privacy certificate m 1`" in card


def test_a_rate_that_does_not_match_the_clients_data_fails_the_certificate(
    registry, empty_state, stub_adapter, tmp_path
):
    register(registry, stub_adapter, tmp_path)
    round_log(empty_state, examples=400)  # charged at 1/41, but 400 examples sample at 1/100
    result = certify(empty_state)
    assert result.exit_code == 1
    assert "Poisson sampling (each example drawn independently): FAILED." in result.output
    assert "client 0: 400 examples sample at 0.01, charged at [0.024" in result.output
