import numpy as np
import pytest
from flwr.simulation import run_simulation

from federated.client_app import build_client_app
from federated.planning import make_plan
from federated.privacy.ledger import sample_rate
from federated.run_config import RunSpec
from federated.run_files import RunFiles
from llm.lora import load_adapter
from llm.model import load_model
from tests.federated.loopback import opacus_epsilon
from tests.federated.tiny_config import tiny


@pytest.mark.integration
def test_one_dp_round_in_simulation_changes_the_adapter_and_reports_epsilon(tmp_path, state):
    _simulate(tiny(tmp_path), state)

    files = RunFiles(state, "tiny-federated")
    [report] = files.rounds()
    assert report.clients == 2 and not report.failed and not report.rejected
    assert report.train_loss is None  # under DP no client's loss leaves it
    assert sorted(c.partition for c in report.per_client.values()) == [0, 1]
    # Each client's epsilon (server's ledger and its own report) against Opacus, recomputed.
    cfg = tiny(tmp_path)
    for partition, part in enumerate(make_plan(cfg).partitions):
        truth = opacus_epsilon([(1.0, sample_rate(len(part), 4), 2)])
        assert report.epsilons[str(partition)] == pytest.approx(truth, rel=1e-9)
    reported = sorted(c.epsilon for c in report.per_client.values())  # the clients' own
    assert reported == pytest.approx(sorted(report.epsilons.values()), rel=1e-9)
    base = state.base_model("tiny")
    before, after = (
        load_adapter(load_model(base), files.adapter_dir(r)).state_dict() for r in (0, 1)
    )
    lora = [k for k in before if "lora_" in k]
    assert lora and any(not np.array_equal(before[k], after[k]) for k in lora)


@pytest.mark.slow
@pytest.mark.integration
def test_a_restarted_run_resumes_after_its_last_saved_round_and_keeps_charging_epsilon(
    tmp_path, state
):
    _simulate(tiny(tmp_path), state)  # 1 of 2 rounds, then "crash"
    files = RunFiles(state, "tiny-federated")
    first_round_adapter = (files.adapter_dir(1) / "adapter_model.safetensors").read_bytes()

    _simulate(tiny(tmp_path, federation={"rounds": 2}), state)

    first, second = files.rounds()
    assert (first.round, second.round) == (1, 2)
    # Round 1 was not trained again, and the restarted clients were charged for it.
    assert (files.adapter_dir(1) / "adapter_model.safetensors").read_bytes() == first_round_adapter
    assert second.epsilon > first.epsilon


def _simulate(cfg, state) -> None:
    from federated.server_app import build_server_app

    run_config = RunSpec(cfg, make_plan(cfg), state).to_flower()
    run_simulation(
        server_app=build_server_app(run_config),
        client_app=build_client_app(run_config),
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}},
    )
