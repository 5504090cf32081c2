"""The plan made at job start (partitions, DP noise) and how it reaches Flower's apps."""

import tomllib

import pytest
import tomli_w
from flwr.common.config import parse_config_args

from cluster.core.config import load_config
from cluster.core.federated_config import FederatedConfig
from federated.partition import PartitionError, client_examples
from federated.plan import FederatedPlan
from federated.planning import make_plan
from federated.privacy.accounting import PrivacyPlanError, recompute_epsilon
from federated.privacy.ledger import sample_rate
from federated.protocol import PARTITION_ID
from federated.run_config import NodeConfig, RunSpec
from tests.federated.tiny_config import REPO, tiny


def test_the_demo_plan_keeps_the_numbers_it_had_when_the_config_derived_them(monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped config's data path is relative to the repository
    cfg = load_config(REPO / "configs" / "federated" / "demo.yaml", FederatedConfig)

    plan = make_plan(cfg)

    assert [len(p) for p in plan.partitions] == [111, 82, 116]  # Dirichlet(1.0), seed 0
    assert sorted(i for p in plan.partitions for i in p) == list(range(plan.pool_size))
    noise = plan.noise
    assert noise.noise_multiplier == 1.142578125  # meets target_epsilon 3 for the smallest client
    assert (noise.steps, noise.sample_rate) == (20, 1 / 11)
    assert noise.sample_rates == [sample_rate(len(p), 8) for p in plan.partitions]
    epsilon = recompute_epsilon(20, 1 / 11, noise.noise_multiplier, 1e-5)
    assert epsilon == pytest.approx(2.99174137, abs=1e-8)


def test_fixed_noise_is_planned_as_given(tmp_path):
    plan = make_plan(tiny(tmp_path))
    assert [len(p) for p in plan.partitions] == [162, 147]  # by_label: two teams each
    assert plan.noise.noise_multiplier == 1.0
    assert (plan.noise.steps, plan.noise.sample_rate) == (2, 1 / 37)


def test_central_dp_accounts_one_release_per_round_at_the_client_sampling_rate(tmp_path):
    cfg = tiny(
        tmp_path,
        privacy={"mode": "central_dp", "noise_multiplier": None, "target_epsilon": 5.0},
        federation={"rounds": 3},
    )
    noise = make_plan(cfg).noise
    assert (noise.steps, noise.sample_rates) == (3, [1.0, 1.0])
    assert noise.noise_multiplier == 1.650390625


def test_no_dp_plans_no_noise(tmp_path):
    cfg = tiny(tmp_path, privacy={"mode": "none", "noise_multiplier": None})
    assert make_plan(cfg).noise is None


def test_a_reachable_target_gives_the_noise_that_meets_it(tmp_path):
    cfg = tiny(tmp_path, privacy={"noise_multiplier": None, "target_epsilon": 4.0})
    noise = make_plan(cfg).noise
    epsilon = recompute_epsilon(noise.steps, noise.sample_rate, noise.noise_multiplier, 1e-5)
    assert 3.9 < epsilon <= 4.0


@pytest.mark.parametrize(
    ("epsilon", "batch_size", "reason"),
    [
        (0.01, 4, "cannot be met by any noise"),  # below what RDP's orders can certify
        (0.5, 64, "drowns the clipped gradients"),  # met only by a noise multiplier near 24
    ],
)
def test_an_unreachable_target_epsilon_fails_the_plan_naming_the_key(
    tmp_path, epsilon, batch_size, reason
):
    cfg = tiny(
        tmp_path,
        privacy={"noise_multiplier": None, "target_epsilon": epsilon},
        federation={"local_steps": 50, "rounds": 3, "batch_size": batch_size},
    )
    with pytest.raises(PrivacyPlanError) as err:
        make_plan(cfg)
    message = str(err.value)
    assert f"privacy.target_epsilon {epsilon}" in message and "150 steps" in message
    assert reason in message and "raise target_epsilon" in message


def test_an_impossible_split_fails_the_plan(tmp_path):
    cfg = tiny(tmp_path, federation={"num_clients": 5})  # by_label, four teams
    with pytest.raises(PartitionError, match="at least one 'team' value per client"):
        make_plan(cfg)


def test_the_plan_survives_flower_s_run_config_file_and_a_node_may_use_its_own_state_dir(
    tmp_path, empty_state
):
    cfg = tiny(tmp_path)
    spec = RunSpec(cfg, make_plan(cfg), empty_state)
    path = tmp_path / "run-config.toml"  # what `flwr run --run-config` reads
    path.write_text(tomli_w.dumps(spec.to_flower()))
    run_config = tomllib.loads(path.read_text())

    assert RunSpec.from_flower(run_config) == spec
    node = NodeConfig(data_path="mine.jsonl", state_dir=str(tmp_path / "client-state"))
    assert RunSpec.from_flower(run_config, node).state.root == tmp_path / "client-state"


def test_node_configs_survive_flower_s_parser():
    in_cluster = NodeConfig(partition=0, warm_trainer="fedforge-t-0", ray_address="10.0.0.1:6379")
    outside = NodeConfig(data_path="/data/our tickets.jsonl", state_dir="/srv/fedforge")
    for node in (in_cluster, outside):
        assert NodeConfig.from_flower(parse_config_args([node.to_flower()])) == node
    # Flower's simulation adds its own keys; they are not ours to read.
    assert NodeConfig.from_flower({PARTITION_ID: 1, "num-partitions": 2}).partition == 1
    with pytest.raises(ValueError, match="exactly one of partition-id"):
        NodeConfig.from_flower({"num-partitions": 2})


def test_a_node_looks_up_its_planned_examples_and_refuses_a_different_dataset(tmp_path):
    cfg = tiny(tmp_path)
    plan = make_plan(cfg)
    assert len(client_examples(cfg.data, plan, 1)) == len(plan.partitions[1])
    with pytest.raises(PartitionError, match="outside 0..1"):
        client_examples(cfg.data, plan, 2)
    other = FederatedPlan(pool_size=plan.pool_size + 1, partitions=plan.partitions)
    with pytest.raises(PartitionError, match="every in-cluster node needs the job's dataset"):
        client_examples(cfg.data, other, 0)
