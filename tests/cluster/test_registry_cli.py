from typer.testing import CliRunner

from cluster.cli import app
from cluster.lineage import Lineage
from cluster.registry import Registry

runner = CliRunner()


def registered(empty_state, adapter, versions=2) -> Registry:
    registry = Registry(empty_state.default_tracking_uri(), empty_state.mlflow_artifacts)
    with registry.run("cli", "cli", {}) as run_id:
        for _ in range(versions):
            registry.register_adapter(
                "demo-model",
                adapter,
                run_id,
                Lineage(kind="finetune", base_model="tiny", metrics={"eval_accuracy": 0.9}),
            )
    return registry


def invoke(state, *args):
    return runner.invoke(app, [*args, "--state-dir", str(state.root)])


def test_list_promote_rollback_show(empty_state, stub_adapter):
    state = empty_state
    registered(state, stub_adapter)
    listing = invoke(state, "registry", "list")
    assert listing.exit_code == 0
    lines = [line.split() for line in listing.output.splitlines()[1:]]
    assert [(row[1], row[2]) for row in lines] == [("1", "-"), ("2", "candidate")]

    assert "production -> v1" in invoke(state, "registry", "promote", "demo-model", "1").output
    assert (
        "production -> v2" in invoke(state, "registry", "promote", "demo-model", "candidate").output
    )
    assert "v1 (rolled back)" in invoke(state, "registry", "rollback", "demo-model").output
    shown = invoke(state, "registry", "show", "demo-model", "production")
    assert shown.exit_code == 0
    assert "demo-model v1  aliases: production" in shown.output
    assert "fedforge.metric.eval_accuracy: 0.9" in shown.output


def test_user_errors_are_one_line_not_a_traceback(empty_state, stub_adapter):
    state = empty_state
    registered(state, stub_adapter, versions=1)
    result = invoke(state, "registry", "rollback", "demo-model")
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "no earlier production version" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    missing = invoke(state, "registry", "show", "demo-model", "9")
    assert missing.exit_code == 2 and "error: no version '9'" in missing.output
    no_record = invoke(state, "privacy", "report", "demo-model:1")
    assert no_record.exit_code == 2 and "has no privacy record" in no_record.output


def test_the_gate_never_brings_back_a_version_rolled_back_from(empty_state, stub_adapter):
    registry = registered(empty_state, stub_adapter)  # v1, v2 at the same accuracy
    registry.promote("demo-model", "1")
    registry.promote("demo-model", "2")
    registry.rollback("demo-model", reason="answers got worse")
    refused = invoke(empty_state, "registry", "gate", "demo-model")
    assert refused.exit_code == 2 and "has not served before" in refused.output
    assert registry.aliases("demo-model")["production"] == "1"
