"""Model cards: generated from a version's lineage and job config at registration, stored beside
its adapter, shown with what happened since by `fedforge registry show NAME VERSION --card`."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.commands.cli import app
from cluster.commands.gate import run_gate
from cluster.core.config import ConfigError, FinetuneConfig, dump_config, load_config
from cluster.records.audit_log import sha256
from cluster.records.lineage import CONFIG_FILE, MODEL_CARD_FILE, Lineage
from cluster.records.privacy_record import DataPrivacy, PrivacyBudget
from cluster.records.registry import Registry

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
CONFIG = FinetuneConfig.model_validate(
    {
        "name": "tickets-ft",
        "data": {
            "path": "llm/demo_task/tickets.jsonl",
            "central_fraction": 0.4,
            "share": "central",
        },
        "card": {
            "intended_use": "Routing English support tickets to one of four queues.",
            "limitations": "Not for medical or legal questions; scored on 60 examples only.",
            "data_description": "Synthetic support tickets written for the demo, CC0.",
        },
    }
)
LINEAGE = Lineage(
    kind="federated",
    base_model="demo",
    run_name="tickets-fed",
    lora_rank=8,
    dataset_digest="ab" * 32,
    config_sha256="cd" * 32,
    metrics={
        "eval_accuracy": 0.8, "base_accuracy": 0.35, "eval_loss": 0.61, "communication_mb": 44.6
    },
    validation_examples=60,
    privacy=PrivacyBudget(
        mode="local_dp", epsilon=2.994, delta=1e-5, noise_multiplier=1.14, max_grad_norm=1.0,
        sample_rate=0.09, steps=20, accountant="rdp",
    ),
    data_privacy={
        "abababababababab/clients": DataPrivacy(
            epsilon=4.2, delta=1e-5, versions=["m:1"]
        ),
        "abababababababab/central": DataPrivacy(epsilon=None, private=False),
    },
    git_revision="0a75213",
    packages={"mlflow": "3.17.2"},
    python="3.11.9",
)  # fmt: skip


def register(registry: Registry, adapter: Path, lineage: Lineage = LINEAGE, files=None):
    with registry.run("cards", "cards", {}) as run_id:
        return registry.register_adapter("m", adapter, run_id, lineage, files=files)


def test_the_card_of_a_registered_version_holds_its_lineage_facts(registry, stub_adapter):
    config_text = dump_config(CONFIG)
    record = register(registry, stub_adapter, files={CONFIG_FILE: config_text})
    card = registry.read_text(record, MODEL_CARD_FILE)  # stored beside the adapter

    assert card.startswith(f"# Model card: `m` v{record.version}")
    assert "| base model | `demo` |" in card and "| adapter | LoRA, rank 8 |" in card
    assert "| kind | federated (run `tickets-fed`) |" in card
    assert f"| MLflow run | `{record.run_id}` |" in card
    # Data: keyed digest, where, which share, and the description from the config.
    assert f"| digest (keyed) | {'ab' * 32} |" in card
    assert "| path | `llm/demo_task/tickets.jsonl` |" in card
    assert "| share used | central (central share: 40% of the training split) |" in card
    assert "Synthetic support tickets written for the demo, CC0." in card
    # Held-out metrics beside the base model's.
    assert "On 60 held-out examples" in card
    assert "| accuracy | 80.0% | 35.0% |" in card and "| loss | 0.61 | - |" in card
    assert "| communication_mb | 44.6 |" in card
    # This run's DP, then epsilon composed per example across versions, per data source.
    assert "| epsilon | 2.994 |" in card and "| delta | 1e-05 |" in card
    assert "| noise multiplier | 1.14 |" in card and "| accountant | rdp |" in card
    assert "| abababababababab/clients | 4.2 | 1e-05 | m:1 |" in card
    assert "| abababababababab/central | no DP by design: no guarantee claimed | - | - |" in card
    # What it is for and not for, then the full config as registered.
    assert "Routing English support tickets to one of four queues." in card
    assert "Not for medical or legal questions" in card
    assert f"```yaml\n{config_text.rstrip()}\n```" in card
    assert "| config sha256 | " + "cd" * 32 in card and "| git revision | 0a75213 |" in card
    # Its hash is in the audit log's register entry.
    (entry,) = registry.history("m")
    assert entry.details["card_sha256"] == sha256(card)


def test_show_card_adds_the_gate_aliases_and_history_and_checks_the_stored_card(
    registry, empty_state, stub_adapter
):
    register(registry, stub_adapter, files={CONFIG_FILE: dump_config(CONFIG)})
    run_gate(registry, "m", registry.versions("m"))
    shown = runner.invoke(
        app, ["registry", "show", "m", "1", "--card", "--state-dir", str(empty_state.root)]
    )
    assert shown.exit_code == 0, shown.output
    out = shown.stdout  # MLflow's download progress goes to stderr
    assert out.startswith("# Model card: `m` v1")
    assert "- aliases now: candidate, production" in out
    assert "promoted v1 (80.0%) over no production version" in out  # the gate's decision
    assert "matches the logged sha256" in out
    assert "promote v1 production: - -> v1  reason: gate: promoted v1" in out

    # The stored card edited afterwards: shown, but flagged.
    stored = next(empty_state.mlflow_artifacts.rglob(MODEL_CARD_FILE))
    stored.write_text(stored.read_text().replace("80.0%", "99.0%"))
    assert "CHANGED since registration" in registry.card(registry.get("m", 1))


def test_a_card_says_what_was_not_recorded(registry, stub_adapter):
    bare = Lineage(kind="test", base_model="tiny")
    card = registry.card(register(registry, stub_adapter, bare))
    assert "_Not stated: set `card.intended_use` in the job config._" in card
    assert "_Not stated: set `card.limitations` in the job config._" in card
    assert "No job config was registered with this version." in card
    assert "No held-out metrics were recorded." in card
    assert "without differential privacy" in card
    assert "- promotion gate: not judged by the gate" in card


def test_a_version_registered_before_cards_gets_one_generated_when_shown(registry, stub_adapter):
    record = register(registry, stub_adapter, files={CONFIG_FILE: dump_config(CONFIG)})
    next(Path(registry.artifact_root).rglob(MODEL_CARD_FILE)).unlink()
    card = registry.card(record)
    assert "generated now: the version predates stored model cards" in card
    assert "| accuracy | 80.0% | 35.0% |" in card and "Routing English support" in card


def test_a_card_that_cannot_be_stored_leaves_no_version(registry, stub_adapter, monkeypatch):
    log_text = registry.client.log_text

    def no_card(run_id, text, path):
        if path.endswith(MODEL_CARD_FILE):
            raise OSError("disk full")
        return log_text(run_id, text, path)

    monkeypatch.setattr(registry.client, "log_text", no_card)
    with pytest.raises(OSError):
        register(registry, stub_adapter, files={CONFIG_FILE: "name: x\n"})
    assert registry.versions("m") == []


def test_card_fields_are_optional_checked_and_recorded_with_the_data_size(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    shipped = load_config(REPO / "configs/finetune/demo.yaml", FinetuneConfig)
    assert "support tickets" in shipped.card.intended_use
    assert load_config(REPO / "configs/finetune/tiny.yaml", FinetuneConfig).card.limitations is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {path: d.jsonl}\ncard: {intended_uses: typo}\n")
    with pytest.raises(ConfigError, match="unknown key 'card.intended_uses'"):
        load_config(bad, FinetuneConfig)


def test_the_demo_report_links_each_new_versions_card_and_the_alias_history(
    registry, empty_state, stub_adapter, tmp_path
):
    from cluster.commands.demo_report import DemoResult, write_report

    fine = register(registry, stub_adapter, files={CONFIG_FILE: dump_config(CONFIG)})
    fed = register(registry, stub_adapter, files={CONFIG_FILE: dump_config(CONFIG)})
    gate = run_gate(registry, "m", [fine, fed])
    result = DemoResult(versions={"fine-tuned": fine, "federated": fed}, gate=gate)
    text = write_report(result, registry, empty_state, tmp_path, "m").read_text()

    assert "- fine-tuned: [m v1](model-card-m-v1.md)" in text
    assert "- federated: [m v2](model-card-m-v2.md)" in text
    assert "[alias-history.md](alias-history.md), log intact." in text
    card = (tmp_path / "model-card-m-v2.md").read_text()
    assert card.startswith("# Model card: `m` v2") and "| epsilon | 2.994 |" in card
    assert "promotion gate: " in card and "not judged" not in card
    history = (tmp_path / "alias-history.md").read_text()
    assert "`fedforge registry verify m`: intact: 3 entries" in history
    assert "promote v1 production: - -> v1  reason: gate: promoted v1" in history
