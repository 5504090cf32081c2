"""What users read: the demo's summary table and report, and `fedforge privacy report`."""

from __future__ import annotations

from cluster.commands.demo_report import DemoResult, summary_table, write_report
from cluster.commands.gate import decide
from cluster.commands.privacy import render_report
from cluster.records.lineage import COMMUNICATION_METRIC, Lineage
from cluster.records.privacy_record import PrivacyBudget, PrivacyRecord, RoundPrivacy
from cluster.records.registry import Registry, VersionRecord


def _version(registry, adapter, accuracy: float, kind: str, extra=None, **lineage) -> VersionRecord:
    with registry.run("report", kind, {}) as run_id:
        steps = range(1, 4)
        key = "loss" if kind == "finetune" else "train_loss"
        for step in steps:
            registry.log_metrics(run_id, {key: 3.0 / step, "epsilon": 0.5 * step}, step)
        metrics = {"eval_accuracy": accuracy, "base_accuracy": 0.1, **(extra or {})}
        lineage = Lineage(kind=kind, base_model="tiny", metrics=metrics, **lineage)
        return registry.register_adapter("m", adapter, run_id, lineage)


def _result(registry: Registry, adapter) -> DemoResult:
    fine = _version(registry, adapter, 0.8, "finetune")
    privacy = PrivacyBudget(mode="local_dp", epsilon=2.994, delta=1e-5)
    extra = {COMMUNICATION_METRIC: 12.34}
    fed = _version(registry, adapter, 0.9, "federated", extra, privacy=privacy)
    return DemoResult(
        versions={"fine-tuned": fine, "federated": fed},
        gate=decide([fine, fed], None),
        endpoint="http://127.0.0.1:8000/v1",
        latencies=[0.3, 0.5, 0.4],
        first_token=[0.1, 0.2, 0.15],
        cold_start=34.2,
        answers=[("Route this", "billing")],
        minutes=8.1,
    )


def test_summary_table_shows_accuracy_privacy_gate_and_latency(registry, stub_adapter):
    result = _result(registry, stub_adapter)
    table = summary_table(result, "m")
    rows = {line.split("   ")[0].strip(): line for line in table.splitlines()}
    assert "10.0%" in rows["held-out accuracy: base model"]
    assert "80.0%" in rows["... fine-tuned, central share (m:1)"]
    assert "(2.99, 1e-05)" in rows["privacy of the federated rounds (epsilon, delta)"]
    assert "promoted v2 (90.0%) over no production version" in rows["gate"]
    assert "150 ms / 200 ms" in rows["first token p50 / p99 (3 streamed requests)"]
    assert "12.3 MB" in rows["communication of the federated rounds (adapter tensors)"]
    assert "34 s" in table and "8.1 min" in table


def test_report_has_the_table_answers_three_plots_and_the_certificate(
    registry, empty_state, stub_adapter, tmp_path
):
    report = write_report(_result(registry, stub_adapter), registry, empty_state, tmp_path, "m")
    text = report.read_text()
    assert "| gate | promoted v2" in text and "| Route this | `billing` |" in text
    for png in ("training_loss.png", "federated.png", "latency.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    # A version trained under DP that logged a training loss: the certificate names the leak.
    assert "[privacy-certificate-m-v2.md](privacy-certificate-m-v2.md)" in text
    assert "release manifest: UNLISTED RELEASES" in text
    certificate = (tmp_path / "privacy-certificate-m-v2.md").read_text()
    assert "run_metric 'train_loss' is released by a run under DP" in certificate


def test_privacy_report_lists_every_round_and_client():
    record = PrivacyRecord(
        mode="local_dp", epsilon=2.994, delta=1e-5, noise_multiplier=1.1426, max_grad_norm=1.0,
        sample_rate=1 / 11, steps=20, accountant="rdp",
        by_round=[
            RoundPrivacy(round=1, clients={"0": 2.1, "1": 2.444}),
            RoundPrivacy(round=2, clients={"0": 2.9, "1": 2.994, "outside-77": 1.5}),
        ],
    )  # fmt: skip
    text = render_report("m:2", record)
    assert text.splitlines()[0] == "m:2: local_dp, epsilon 2.994 at delta 1e-05 (rdp accountant)"
    assert "noise multiplier 1.143" in text and "20 steps per client" in text
    assert text.splitlines()[-3].split()[-1] == "outside-77"  # header: outside clients last
    last = text.splitlines()[-1].split()
    assert last == ["2", "2.994", "2.900", "2.994", "1.500"]
    assert render_report("m:1", PrivacyRecord(mode="none")) == "m:1: none (no differential privacy)"
