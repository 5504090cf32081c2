"""The engine replica's settings: what each serve YAML turns into for Ray Serve LLM."""

from __future__ import annotations

import asyncio

import pytest

from cluster.core.config import ModelSettings, load_config
from cluster.core.serve_config import ServeConfig
from cluster.core.state import ModelNotFoundError
from serve.app import llm_config
from serve.engine import EngineServer, LocalModelCallback


def test_demo_config_builds_the_engine_replica_it_documents(state):
    cfg = load_config("configs/serve/demo.yaml", ServeConfig)
    config = llm_config(cfg, state)
    assert config.model_loading_config.model_source == str(state.demo_model)
    assert config.server_cls is EngineServer
    assert config.callback_config.callback_class == "serve.engine:LocalModelCallback"
    assert config.experimental_configs["stream_batching_interval_ms"] == 0
    assert config.engine_kwargs["enable_lora"] and config.engine_kwargs["dtype"] == "float32"
    assert config.deployment_config["autoscaling_config"]["max_replicas"] == 2


@pytest.mark.parametrize("local", [True, False])
def test_node_init_is_skipped_only_for_a_model_already_on_disk(state, tmp_path, local):
    cfg = load_config("configs/serve/tiny.yaml", ServeConfig)
    config = llm_config(cfg, state)
    source = str(tmp_path) if local else "HuggingFaceTB/SmolLM2-135M-Instruct"
    config.model_loading_config.model_source = source
    callback = LocalModelCallback(llm_config=config)
    asyncio.run(callback.on_before_node_init())
    assert callback.ctx.run_init_node is not local


@pytest.mark.parametrize(
    ("base", "named"), [("tiny", "models/tiny-llama-h128"), ("./no-such-model", "no-such-model")]
)
def test_a_missing_model_directory_fails_before_any_engine_starts(empty_state, base, named):
    cfg = ServeConfig(model=ModelSettings(base=base))
    with pytest.raises(ModelNotFoundError, match=named):
        llm_config(cfg, empty_state)
