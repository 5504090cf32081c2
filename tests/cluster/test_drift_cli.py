"""`fedforge drift report`, `drift retrain` and `audit request` on a real registry and request
log: the demo task's held-out tickets as traffic from the training distribution, tickets about
a product line the training data never mentions as shifted traffic.

Each verdict uses the drift settings' fixed seed, so it is the same on every run; the chance
that traffic from the training distribution is called drifted is at most alpha (0.01 here), by
construction of the tests (tests/cluster/test_drift.py measures it over 100 trials).
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import pytest
import yaml
from typer.testing import CliRunner

from cluster.commands.cli import app
from cluster.core.config import DataSettings
from cluster.core.jobs import FINETUNE
from cluster.records.lineage import TRAINING_PROFILE_FILE, Lineage
from cluster.records.prompt_features import prompt_features, prompt_text, training_profile
from cluster.records.registry import Registry
from cluster.records.request_log import AnsweredRequest, RequestLogWriter, utc_iso
from llm.data import load_split

MODEL = "fedforge-tiny"  # configs/finetune/tiny.yaml registers it
TICKETS = "llm/demo_task/tickets.jsonl"
runner = CliRunner()
NEW_PRODUCT = (
    "the Helios solar inverter reports error E-42 at sunrise",
    "battery storage module shows 0% after the firmware flash",
    "inverter fan is loud when the panels produce over 5 kW",
    "grid export limit resets to 3.6 kW every night",
    "the monitoring portal lost two days of yield data",
    "microinverter {n} blinks orange and red",
)


def shifted_prompts(n: int, seed: int = 7) -> list[str]:
    """Tickets in the training data's frame about something it never covered."""
    rng = random.Random(seed)
    return [
        "Route this support ticket: "
        + rng.choice(("", "Hello, ", "Urgent: "))
        + rng.choice(NEW_PRODUCT).format(n=rng.randint(100, 999))
        + rng.choice(("", " Please help.", " What should I do?"))
        for _ in range(n)
    ]


@pytest.fixture
def served(empty_state, stub_adapter, tmp_path):
    """A version trained on the tickets' training split, in production, and a serve config."""
    split = load_split(DataSettings(path=TICKETS, validation_fraction=0.2))
    profile = training_profile([prompt_text(e.prompt_messages) for e in split.train])
    registry = Registry(empty_state.default_tracking_uri(), empty_state.mlflow_artifacts)
    with registry.run("drift", MODEL, {}) as run_id:
        lineage = Lineage(
            kind="finetune",
            base_model="tiny",
            dataset_digest="ab" * 32,
            metrics={"eval_accuracy": 0.0},
        )
        files = {TRAINING_PROFILE_FILE: profile}
        registry.register_adapter(MODEL, stub_adapter, run_id, lineage, files=files)
    registry.promote(MODEL, "1", reason="first")
    config = tmp_path / "serve.yaml"
    drift = {"window": "1h", "alpha": 0.01, "min_prompts": 50}
    config.write_text(yaml.safe_dump({"request_log": {"enabled": True}, "drift": drift}))
    held_out = [prompt_text(e.prompt_messages) for e in split.validation]
    return registry, config, held_out


def log_answers(state, prompts: list[str], version: str = "1", digest: str = "") -> list[str]:
    writer = RequestLogWriter(state.request_log, "test", 30)
    now = datetime.now(UTC)
    ids = []
    for i, prompt in enumerate(prompts):
        ids.append(f"req-{version}-{i}")
        writer.write(
            AnsweredRequest(
                request_id=ids[-1],
                time=utc_iso((now - timedelta(milliseconds=len(prompts) - 1 - i)).timestamp()),
                latency_ms=100.0,
                key_id="0123456789ab",
                route="chat",
                model=MODEL,
                answered_by=f"{MODEL}:{version}",
                adapter=MODEL,
                version=version,
                adapter_sha256=digest or None,
                stream=False,
                complete=True,
                prompt_tokens=30,
                completion_tokens=4,
                features=prompt_features(prompt).to_json(),
            )
        )
    return ids


def invoke(state, *args):
    return runner.invoke(app, [*args, "--state-dir", str(state.root)])


def report(state, config, out):
    return invoke(
        state, "drift", "report", "--model", MODEL, "--serve-config", str(config), "--out", str(out)
    )


def test_held_out_tickets_are_not_drift_and_a_new_product_line_is(empty_state, served, tmp_path):
    registry, config, held_out = served
    assert len(held_out) >= 100
    log_answers(empty_state, held_out)
    same = report(empty_state, config, tmp_path / "same")
    assert same.exit_code == 0, same.output
    assert f"{MODEL} v1, {len(held_out)} prompts" in same.output and "no drift" in same.output
    assert json.loads((tmp_path / "same" / "drift.json").read_text())["result"]["drift"] is False

    log_answers(empty_state, shifted_prompts(len(held_out)))  # half the window is new traffic
    shifted = report(empty_state, config, tmp_path / "shifted")
    assert shifted.exit_code == 1, shifted.output
    assert "drift: " in shifted.output and "sketch" in shifted.output
    png = (tmp_path / "shifted" / "drift.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_too_little_traffic_gets_no_verdict_and_no_logging_a_clear_error(
    empty_state, served, tmp_path
):
    _, config, held_out = served
    nothing = report(empty_state, config, tmp_path / "none")
    assert nothing.exit_code == 2 and "request_log.prompt_features" in nothing.output
    log_answers(empty_state, held_out[:20])
    few = report(empty_state, config, tmp_path / "few")
    assert few.exit_code == 3 and "too little traffic" in few.output


def test_edited_log_lines_are_skipped_and_counted_not_a_traceback(empty_state, served, tmp_path):
    _, config, held_out = served
    log_answers(empty_state, held_out)
    (path,) = empty_state.request_log.glob("*.jsonl")
    first = json.loads(path.read_text().splitlines()[0])
    with path.open("a") as f:
        f.write(json.dumps({**first, "features": {"v": 1, "scalars": {}}}) + "\n")
        f.write(json.dumps({**first, "features": {"v": 99, "scalars": {}, "sketch": []}}) + "\n")
        f.write("not json at all\n")
    result = report(empty_state, config, tmp_path / "edited")
    assert result.exit_code == 0 and "no drift" in result.output
    assert f"{len(held_out)} prompts" in result.output
    assert "skipped 2 logged answers whose features are malformed" in result.output


def test_a_version_without_a_training_profile_is_named_not_a_traceback(
    empty_state, served, stub_adapter, tmp_path
):
    registry, config, held_out = served
    with registry.run("drift", MODEL, {}) as run_id:  # registered before profiles existed
        registry.register_adapter(MODEL, stub_adapter, run_id, Lineage(kind="x", base_model="t"))
    log_answers(empty_state, held_out)
    args = ("--serve-config", str(config), "--version", "2", "--out", str(tmp_path / "r"))
    result = invoke(empty_state, "drift", "report", "--model", MODEL, *args)
    assert result.exit_code == 2 and "v2 has no readable training profile" in result.output


def test_retrain_submits_on_drift_once_then_waits_for_the_gate(empty_state, served, stub_adapter):
    registry, config, held_out = served
    args = ("drift", "retrain", "--model", MODEL, "--config", "configs/finetune/tiny.yaml")
    args += ("--serve-config", str(config), "--dry-run")
    log_answers(empty_state, held_out)
    calm = invoke(empty_state, *args)
    assert calm.exit_code == 0 and "no drift" in calm.output and "retraining" not in calm.output

    log_answers(empty_state, shifted_prompts(2 * len(held_out)))
    drifted = invoke(empty_state, *args)
    assert drifted.exit_code == 0, drifted.output
    assert (
        "retraining: python -m llm.finetune --config configs/finetune/tiny.yaml" in drifted.output
    )

    with registry.run("drift", MODEL, {}) as run_id:  # what the job leaves: a candidate
        registry.register_adapter(
            MODEL, stub_adapter, run_id, Lineage(kind="finetune", base_model="tiny")
        )
    waiting = invoke(empty_state, *args)
    assert "not retraining: candidate v2 awaits the gate" in waiting.output
    assert registry.aliases(MODEL)["production"] == "1"  # nothing promoted without the gate

    other = invoke(empty_state, *args[:2], "--model", "someone-else", *args[4:])
    assert other.exit_code == 2 and "registers 'fedforge-tiny', not 'someone-else'" in other.output
    elsewhere = invoke(empty_state, *args, "--tracking-uri", "http://other-mlflow:5000")
    assert elsewhere.exit_code == 2 and "another registry than the one checked" in elsewhere.output


def test_audit_request_names_the_version_its_digest_data_and_who_promoted_it(empty_state, served):
    registry, _, held_out = served
    record = registry.get(MODEL, "1")
    (request_id,) = log_answers(empty_state, held_out[:1], digest=record.adapter_sha256)
    result = invoke(empty_state, "audit", "request", request_id)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"answered by {MODEL}:1" in out and "adapter digest matches the registered files" in out
    assert "digest (keyed) " + "ab" * 32 in out and "promote v1 production: - -> v1" in out
    assert "reason: first" in out

    (forged,) = log_answers(empty_state, held_out[:1], version="1", digest="0" * 64)
    assert "DIFFERS" in invoke(empty_state, "audit", "request", forged).output
    # A caller who reuses someone's X-Request-ID does not hide the first answer: both show.
    assert invoke(empty_state, "audit", "request", request_id).output.count("answered by") == 2
    missing = invoke(empty_state, "audit", "request", "no-such-id")
    assert missing.exit_code == 2 and "request_log.enabled" in missing.output


@pytest.mark.slow
@pytest.mark.integration
def test_retrain_runs_the_job_and_only_the_gate_promotes_its_candidate(state, served):
    registry, config, held_out = served
    log_answers(state, held_out + shifted_prompts(len(held_out)))
    args = ("--config", "configs/finetune/tiny.yaml", "--serve-config", str(config))
    result = invoke(state, "drift", "retrain", "--model", MODEL, *args)
    assert result.exit_code == 0, result.output
    assert "drift: " in result.output and "retraining: python -m llm.finetune" in result.output
    aliases = registry.aliases(MODEL)
    assert (aliases["production"], aliases["candidate"]) == ("1", "2")  # a candidate, no more
    new = registry.get(MODEL, "2")
    assert new.lineage.kind == "finetune" and len(new.adapter_sha256) == 64
    assert '"prompts"' in registry.read_text(new, TRAINING_PROFILE_FILE)  # drift can use it next

    again = invoke(state, "drift", "retrain", "--model", MODEL, *args)
    assert "not retraining: candidate v2 awaits the gate" in again.output

    gate = invoke(state, "registry", "gate", MODEL)
    assert gate.exit_code == 0 and "gate: " in gate.output
    promoted = "promoted v2" in gate.output
    assert registry.aliases(MODEL)["production"] == ("2" if promoted else "1")
    assert registry.history(MODEL)[-1].reason.startswith("gate: ") or not promoted


def test_retrain_starts_at_most_one_job_at_once_and_none_again_after_a_failure(
    empty_state, served, monkeypatch
):
    """Two starts at the same moment: one job. A job that failed: no second one within the
    cooldown (the marker is written before the job, so a failure counts)."""
    import cluster.commands.drift
    from cluster.commands.retrain_guard import only_retrain
    from cluster.core.errors import UserError

    _, config, held_out = served
    started: list[str] = []

    def failing_job(module, *args, address=None):
        started.append(module)
        raise UserError("the job failed")

    monkeypatch.setattr(cluster.commands.drift, "run_module", failing_job)
    args = ("drift", "retrain", "--model", MODEL, "--config", "configs/finetune/tiny.yaml")
    args += ("--serve-config", str(config))
    log_answers(empty_state, shifted_prompts(2 * len(held_out)))
    with only_retrain(empty_state, MODEL):  # another start is running its job right now
        concurrent = invoke(empty_state, *args)
    assert f"not retraining: another retrain of '{MODEL}' is running" in concurrent.output
    assert started == []
    failed = invoke(empty_state, *args)
    assert failed.exit_code == 2 and started == [FINETUNE.module]
    again = invoke(empty_state, *args)
    assert f"not retraining: the last retrain of '{MODEL}' started" in again.output
    assert started == [FINETUNE.module]  # still one job
