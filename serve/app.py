"""The Ray Serve application: vLLM behind Ray Serve LLM's OpenAI app, from one ServeConfig.

`build_app` is the one builder; `app_builder` is the same thing for a Serve config file
(`import_path: serve.app:app_builder`, `args: {config: ..., state_dir: ...}`), so `serve run`,
`serve deploy`, a KubeRay RayService and `python -m serve.deploy` all build the same app.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import make_fastapi_ingress
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.core.config import load_config
from cluster.core.serve_config import ServeConfig
from cluster.core.state import StateDir
from cluster.records.registry import Registry, tracking_uri
from serve.access.keys import load_key_hashes
from serve.adapter_loader import STORE_KEY
from serve.adapters import AdapterSource
from serve.answers.errors import error_for_exception
from serve.answers.log import AnswerLogSettings
from serve.ingress import KeyCheckedIngress
from serve.ray_internal import DEFAULT_ENDPOINTS, fastapi_app, to_model_metadata

# Only the routes KeyCheckedIngress overrides and checks, plus a readiness probe: the stock
# ingress's other routes (/tokenize, /detokenize, /v1/embeddings, /v1/score, audio) would reach
# the engine without a key. Every other path gets an OpenAI-shaped 404.
SERVED = ("models", "model_data", "completions", "chat")
ENDPOINTS = {
    **{name: DEFAULT_ENDPOINTS[name] for name in SERVED},
    "health": lambda app: app.get("/health"),
}
DOCS_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
ENGINE_SERVER_CLASS = "serve.engine:EngineServer"
LOCAL_MODEL_CALLBACK = "serve.engine:LocalModelCallback"


def adapter_store(cfg: ServeConfig, state: StateDir) -> dict:
    """Where engine replicas fetch registry adapters from (see serve.engine.EngineServer)."""
    # Open the store here, once: a fresh SQLite store is created and migrated on first use, and
    # replicas starting together would race on that migration (alembic fails for all but one).
    uri = tracking_uri(cfg.registry, state)
    Registry(uri)
    cache_dir = cfg.adapters.cache_dir or str(state.root / "serve" / "adapters")
    return {"tracking_uri": uri, "cache_dir": cache_dir}


def adapter_source(cfg: ServeConfig, state: StateDir) -> AdapterSource | None:
    if not cfg.adapters.enabled:
        return None
    return AdapterSource(
        tracking_uri=tracking_uri(cfg.registry, state),
        base_id=cfg.model_id,
        base_model=cfg.model.base if cfg.adapters.same_base_only else None,
        max_lora_rank=cfg.engine.max_lora_rank,
        models=tuple(cfg.adapters.models) if cfg.adapters.models is not None else None,
        refresh_seconds=cfg.adapters.refresh_seconds,
    )


def llm_config(cfg: ServeConfig, state: StateDir) -> LLMConfig:
    # First: a missing model directory fails here, naming it, before any store or replica.
    model_source = state.base_model(cfg.model.base)
    scaling = cfg.autoscaling
    experimental = {"stream_batching_interval_ms": cfg.engine.stream_batching_ms}
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
        experimental[STORE_KEY] = adapter_store(cfg, state)
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
        experimental_configs=experimental,
        **lora_options,
    )


async def _http_error(request, exc):
    return error_for_exception(exc)


def ingress_app():
    """The FastAPI app of the ingress: Ray Serve LLM's (its middleware and metrics), less its
    API docs (they would list routes without a key), with 404/405 in OpenAI's error shape."""
    app = fastapi_app()
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", "") not in DOCS_PATHS]
    app.openapi_url = app.docs_url = app.redoc_url = None
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return app


def ingress_deployment():
    """KeyCheckedIngress with its routes registered on `ingress_app()` (see ENDPOINTS)."""
    return make_fastapi_ingress(KeyCheckedIngress, endpoint_map=ENDPOINTS, app=ingress_app())


def fair_use(cfg: ServeConfig) -> dict | None:
    """serve.access.budgets.FairUse's arguments, None when no limit is set."""
    auth = cfg.auth
    if not auth.rate_limit_per_minute and not auth.tokens_per_minute:
        return None
    return {
        "requests_per_minute": auth.rate_limit_per_minute,
        "request_burst": auth.rate_limit_burst,
        "tokens_per_minute": auth.tokens_per_minute,
        "max_callers": auth.max_tracked_callers,
    }


def answer_log(cfg: ServeConfig, state: StateDir) -> AnswerLogSettings | None:
    """Where and what the ingress logs per answer, None when the request log is off."""
    settings = cfg.request_log
    if not settings.enabled:
        return None
    return AnswerLogSettings(
        directory=settings.dir or str(state.request_log),
        retention_days=settings.retention_days,
        prompt_features=settings.prompt_features,
        prompt_text=settings.prompt_text,
    )


def build_app(cfg: ServeConfig, state: StateDir) -> Application:
    """Ray Serve LLM's OpenAI app, composed the way its docs show for a custom ingress
    (build_openai_app takes no extra routes)."""
    config = llm_config(cfg, state)
    options = KeyCheckedIngress.get_deployment_options([config])
    # The ingress only routes; with its default CPU a 2-CPU node never schedules it next to
    # the engine replica and its bundle.
    options["ray_actor_options"] = {**options.get("ray_actor_options", {}), "num_cpus": 0}
    return serve.deployment(ingress_deployment(), **options).bind(
        llm_deployments={cfg.model_id: build_llm_deployment(config)},
        model_cards={cfg.model_id: to_model_metadata(cfg.model_id, config)},
        api_key_hashes=load_key_hashes(cfg.auth),
        max_model_len=cfg.engine.max_model_len,
        limits=cfg.limits,
        adapter_source=adapter_source(cfg, state),
        fair_use=fair_use(cfg),
        answer_log=answer_log(cfg, state),
    )


def app_builder(args: dict) -> Application:
    """Entry for Serve config files: `args` = {config: <yaml path>, state_dir: <dir>}."""
    cfg = load_config(args["config"], ServeConfig)
    return build_app(cfg, StateDir.resolve(args.get("state_dir")))
