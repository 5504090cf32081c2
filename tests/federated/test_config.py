import pytest

from cluster.config import ConfigError
from federated.config import flower_run_config, from_run_config, load_federated_config
from tests.federated.conftest import REPO, write_config


@pytest.mark.parametrize("name", ["demo", "tiny", "gpu"])
def test_shipped_configs_load(name, monkeypatch):
    monkeypatch.chdir(REPO)  # their data paths are relative to the repository
    cfg = load_federated_config(REPO / "configs" / "federated" / f"{name}.yaml")
    assert cfg.privacy.mode == "local_dp"
    assert cfg.noise_multiplier() > 0


@pytest.mark.parametrize(
    ("epsilon", "batch_size", "reason"),
    [
        (0.01, 4, "cannot be met by any noise"),  # below what RDP's orders can certify
        (0.5, 64, "drowns the clipped gradients"),  # met only by a noise multiplier near 24
    ],
)
def test_unreachable_target_epsilon_is_refused_with_the_reason(
    tmp_path, epsilon, batch_size, reason
):
    path = write_config(
        tmp_path,
        privacy={"noise_multiplier": None, "target_epsilon": epsilon},
        federation={"local_steps": 50, "rounds": 3, "batch_size": batch_size},
    )
    with pytest.raises(ConfigError) as err:
        load_federated_config(path)
    message = str(err.value)
    assert f"privacy.target_epsilon {epsilon}" in message and "150 steps" in message
    assert reason in message and "raise target_epsilon" in message


def test_noise_and_target_together_are_refused(tmp_path):
    path = write_config(tmp_path, privacy={"target_epsilon": 5.0})
    with pytest.raises(ConfigError, match="exactly one of privacy.noise_multiplier"):
        load_federated_config(path)


def test_reachable_target_gives_the_noise_that_meets_it(tmp_path):
    from federated.privacy import recompute_epsilon

    cfg = load_federated_config(
        write_config(tmp_path, privacy={"noise_multiplier": None, "target_epsilon": 4.0})
    )
    steps, rate = cfg.dp_steps_and_rate()
    epsilon = recompute_epsilon(steps, rate, cfg.noise_multiplier(), cfg.privacy.delta)
    assert 3.9 < epsilon <= 4.0


def test_run_config_carries_the_config_and_a_node_may_use_its_own_state_dir(tmp_path, state):
    cfg = load_federated_config(write_config(tmp_path))
    run_config = flower_run_config(cfg, state)

    assert from_run_config(run_config) == (cfg, state)
    node_state = tmp_path / "client-state"
    _, seen = from_run_config(run_config, {"state-dir": str(node_state)})
    assert seen.root == node_state


def test_supernode_auth_without_tls_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="supernode_auth needs flower.tls"):
        load_federated_config(write_config(tmp_path, flower={"supernode_auth": True}))
