"""The federated config schema (cluster.core.federated_config): the shipped files and its rules."""

import pytest

from cluster.core.config import ConfigError, load_config
from cluster.core.federated_config import FederatedConfig
from tests.federated.tiny_config import REPO, tiny, write_config


@pytest.mark.parametrize("name", ["demo", "tiny", "gpu"])
def test_shipped_configs_load_with_local_dp(name):
    cfg = load_config(REPO / "configs" / "federated" / f"{name}.yaml", FederatedConfig)
    assert cfg.privacy.mode == "local_dp"
    assert (cfg.privacy.noise_multiplier is None) != (cfg.privacy.target_epsilon is None)


def test_noise_and_target_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of privacy.noise_multiplier"):
        tiny(tmp_path, privacy={"target_epsilon": 5.0})


def test_an_unreachable_target_is_not_the_config_s_business(tmp_path):
    # Pure data: the noise search runs when the job plans (see test_plan), not on load.
    cfg = tiny(tmp_path, privacy={"noise_multiplier": None, "target_epsilon": 0.01})
    assert cfg.privacy.target_epsilon == 0.01


def test_supernode_auth_without_tls_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="supernode_auth needs flower.tls"):
        load_config(write_config(tmp_path, flower={"supernode_auth": True}), FederatedConfig)


def test_more_required_nodes_than_clients_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"min_train_nodes \(3\).*num_clients \(2\)"):
        tiny(tmp_path, federation={"min_train_nodes": 3})
