"""The Ray Serve application: vLLM behind Ray Serve LLM's OpenAI app, from one ServeConfig.

`build_app` is the one builder; `app_builder` is the same thing for a Serve config file
(`import_path: serve.app:app_builder`, `args: {config: ..., state_dir: ...}`), so `serve run`,
`serve deploy`, a KubeRay RayService and `python -m serve.deploy` all build the same app.
Building has no side effects: it reads the config, the API keys and whether the model directory
exists, and opens no store and writes no file (the replicas do what needs I/O, at start).
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application
from ray.serve.llm import LLMConfig, build_llm_deployment

from cluster.core.config import load_config
from cluster.core.serve_config import ServeConfig
from cluster.core.state import StateDir
from serve.ingress import KeyCheckedIngress, ingress_deployment
from serve.ray_internal import to_model_metadata
from serve.settings import serving_settings

# Ray Serve LLM resolves these "module:Class" strings in each engine replica.
ENGINE_SERVER_CLASS = "serve.engine:EngineServer"
LOCAL_MODEL_CALLBACK = "serve.engine:LocalModelCallback"


def llm_config(cfg: ServeConfig, state: StateDir) -> LLMConfig:
    # First: a missing model directory fails here, naming it, before any replica starts.
    model_source = state.base_model(cfg.model.base)
    scaling = cfg.autoscaling
    lora_engine, lora_options = {}, {}
    if cfg.adapters.enabled:
        lora_engine = {
            "enable_lora": True,
            "max_loras": cfg.engine.max_loras,
            "max_lora_rank": cfg.engine.max_lora_rank,
        }
        # No dynamic_lora_loading_path: EngineServer fetches from the registry instead.
        lora_options = {
            "lora_config": {"max_num_adapters_per_replica": cfg.adapters.max_per_replica}
        }
    return LLMConfig(
        model_loading_config={
            "model_id": cfg.model_id,
            "model_source": model_source,
        },
        accelerator_config={"kind": cfg.accelerator},
        placement_group_config={
            "bundles": [{"CPU": cfg.cpus_per_replica}]
            if cfg.accelerator == "cpu"
            else [{"GPU": 1, "CPU": cfg.cpus_per_replica}],
            "strategy": "PACK",
        },
        engine_kwargs={
            "dtype": cfg.engine.dtype,
            "max_model_len": cfg.engine.max_model_len,
            "enforce_eager": cfg.engine.enforce_eager,
            **lora_engine,
        },
        server_cls=ENGINE_SERVER_CLASS,
        callback_config={"callback_class": LOCAL_MODEL_CALLBACK},
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(cfg.engine.kv_cache_gb)}},
        deployment_config={
            "max_ongoing_requests": cfg.max_ongoing_requests,
            "max_queued_requests": cfg.max_queued_requests,
            "autoscaling_config": {
                "min_replicas": scaling.min_replicas,
                "initial_replicas": max(scaling.min_replicas, 1),
                "max_replicas": scaling.max_replicas,
                "target_ongoing_requests": scaling.target_ongoing_requests,
                "upscale_delay_s": scaling.upscale_delay_s,
                "downscale_delay_s": scaling.downscale_delay_s,
            },
        },
        experimental_configs={"stream_batching_interval_ms": cfg.engine.stream_batching_ms},
        **lora_options,
    )


def build_app(cfg: ServeConfig, state: StateDir) -> Application:
    """Ray Serve LLM's OpenAI app, composed the way its docs show for a custom ingress
    (build_openai_app takes no extra routes). The ingress and every engine replica get the
    same ServingSettings."""
    config = llm_config(cfg, state)
    settings = serving_settings(cfg, state)
    options = KeyCheckedIngress.get_deployment_options([config])
    # The ingress only routes; with its default CPU a 2-CPU node never schedules it next to
    # the engine replica and its bundle.
    options["ray_actor_options"] = {**options.get("ray_actor_options", {}), "num_cpus": 0}
    engine = build_llm_deployment(config, bind_kwargs={"settings": settings})
    return serve.deployment(ingress_deployment(), **options).bind(
        llm_deployments={cfg.model_id: engine},
        model_cards={cfg.model_id: to_model_metadata(cfg.model_id, config)},
        settings=settings,
    )


def app_builder(args: dict) -> Application:
    """Entry for Serve config files: `args` = {config: <yaml path>, state_dir: <dir>}."""
    cfg = load_config(args["config"], ServeConfig)
    return build_app(cfg, StateDir.resolve(args.get("state_dir")))
