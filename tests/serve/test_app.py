"""The app builder: one frozen settings object for the ingress and the engine replicas, built
without side effects (no store opened, no file or directory written)."""

from __future__ import annotations

import dataclasses

import pytest

from cluster.core.config import ModelSettings, load_config
from cluster.core.serve_config import ServeConfig
from cluster.core.state import StateDir
from serve.app import build_app


@pytest.fixture
def no_ray_left():
    """Ray Serve LLM's builder connects this process to Ray (a local one it starts): later tests
    start their own and must find none."""
    import ray

    yield
    ray.shutdown()


def test_the_builder_hands_one_frozen_settings_object_and_writes_nothing(
    provisioned, tmp_path, monkeypatch, no_ray_left
):
    # The demo config serves registry adapters and logs answers: both once made the builder
    # open (and create) the registry store.
    cfg = load_config("configs/serve/demo.yaml", ServeConfig)
    cfg = cfg.model_copy(update={"model": ModelSettings(base=str(provisioned.tiny_model))})
    monkeypatch.setenv(cfg.auth.api_keys_env, "sk-build")
    state = StateDir(tmp_path / "state")  # not StateDir.resolve, which makes the directory

    ingress = build_app(cfg, state)._bound_deployment
    assert not state.root.exists()  # nothing written under the state dir: no store, no log
    (engine,) = ingress.init_kwargs["llm_deployments"].values()
    settings = ingress.init_kwargs["settings"]
    assert engine._bound_deployment.init_kwargs["settings"] is settings
    assert set(ingress.init_kwargs) == {"llm_deployments", "model_cards", "settings"}
    assert settings.adapters.max_lora_rank == cfg.engine.max_lora_rank
    assert settings.answer_log.directory == str(state.request_log)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.key_hashes = ()
