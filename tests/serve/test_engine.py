"""The engine replica's settings: what each serve YAML turns into for Ray Serve LLM."""

from __future__ import annotations

import asyncio

import pytest

from cluster.config import load_config
from cluster.state import StateDir
from serve.app import llm_config
from cluster.serve_config import ServeConfig
from serve.engine import EngineServer, LocalModelCallback


def test_demo_config_builds_the_engine_replica_it_documents(tmp_path):
    cfg = load_config("configs/serve/demo.yaml", ServeConfig)
    config = llm_config(cfg, StateDir.resolve(tmp_path))
    assert config.server_cls is EngineServer
    assert config.callback_config.callback_class == "serve.engine:LocalModelCallback"
    assert config.experimental_configs["stream_batching_interval_ms"] == 0
    assert config.engine_kwargs["enable_lora"] and config.engine_kwargs["dtype"] == "float32"
    assert config.deployment_config["autoscaling_config"]["max_replicas"] == 2


@pytest.mark.parametrize("local", [True, False])
def test_node_init_is_skipped_only_for_a_model_already_on_disk(tmp_path, local):
    cfg = load_config("configs/serve/tiny.yaml", ServeConfig)
    config = llm_config(cfg, StateDir.resolve(tmp_path))
    source = str(tmp_path) if local else "HuggingFaceTB/SmolLM2-135M-Instruct"
    config.model_loading_config.model_source = source
    callback = LocalModelCallback(llm_config=config)
    asyncio.run(callback.on_before_node_init())
    assert callback.ctx.run_init_node is not local
