from typer.testing import CliRunner

from cluster.commands.cli import app
from cluster.records.lineage import Lineage
from cluster.records.privacy_record import DataPrivacy
from cluster.records.registry import Registry

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


def test_a_budget_binds_every_path_that_moves_production(empty_state, stub_adapter):
    """Set once by the first config that asks, raised only by the audited command; promote,
    rollback and the gate refuse a version whose ancestry spent past it, naming the overrun."""
    registry = Registry(empty_state.default_tracking_uri(), empty_state.mlflow_artifacts)

    def register(epsilon: float | None, asked: float | None) -> str:
        spent = {
            "ab12/clients": DataPrivacy(epsilon=epsilon, delta=1e-5),
            "ab12/central": DataPrivacy(epsilon=None, private=False),
        }
        accuracy = {"eval_accuracy": 0.5 + (epsilon or 9) / 100}
        lineage = Lineage(kind="federated", base_model="tiny", data_privacy=spent, metrics=accuracy)
        with registry.run("cli", "budget", {}) as run_id:
            version = registry.register_adapter(
                "m", stub_adapter, run_id, lineage, privacy_budget=asked
            )
        return version.version

    within = register(2.5, asked=3.0)  # v1: the model adopts budget 3
    over = register(4.2, asked=10.0)  # v2: a later config cannot raise it
    no_dp = register(None, asked=None)  # v3: clients' examples also used without DP
    assert registry.privacy_budget("m") == 3.0
    promoted = invoke(empty_state, "registry", "promote", "m", within)
    assert promoted.exit_code == 0, promoted.output
    refused = invoke(empty_state, "registry", "promote", "m", over)
    assert refused.exit_code == 2
    assert "v2: its ancestry spent epsilon 4.200 of data ab12/clients, budget 3 (1.200 over)" in (
        refused.output
    )
    no_guarantee = invoke(empty_state, "registry", "promote", "m", no_dp)
    assert "used data ab12/clients without differential privacy" in no_guarantee.output
    gate = invoke(empty_state, "registry", "gate", "m")
    assert "refused v2" in gate.output and "refused v3" in gate.output
    assert registry.aliases("m")["production"] == within

    raised = invoke(empty_state, "registry", "budget", "m", "5", "--reason", "board approved")
    assert raised.exit_code == 0 and "epsilon 3.0 -> 5" in raised.output
    assert invoke(empty_state, "registry", "promote", "m", over).exit_code == 0
    lowered = invoke(empty_state, "registry", "budget", "m", "2")
    assert lowered.exit_code == 0
    rollback = invoke(empty_state, "registry", "rollback", "m")  # back to v1: spent 2.5 > 2
    assert rollback.exit_code == 2 and "v1: its ancestry spent epsilon 2.500" in rollback.output
    assert registry.aliases("m")["production"] == over
    history = invoke(empty_state, "registry", "history", "m").output
    assert "budget epsilon - -> 3  reason: the first budget a job config set" in history
    assert "budget epsilon 3 -> 5  reason: board approved" in history
    shown = invoke(empty_state, "registry", "show", "m", over).output
    assert "privacy budget: epsilon 2 per data source" in shown
    assert "spent of data ab12/clients: epsilon 4.2 at delta 1e-05  OVER BUDGET" in shown
    assert "spent of data ab12/central: used without DP by design" in shown
