"""What the serving replicas are told: one frozen object, built once from the serve config.

The app builder (serve.app) builds it and hands the same object to the ingress replica and to
every engine replica; each part is read by the module of its concern. Building it opens no store
and writes no file: a replica that needs the registry or a directory makes it at start. The API
keys are read here, from the environment and key file of the process that deploys, because the
replicas do not inherit that environment, and so that a missing key fails before Serve starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.core.serve_config import ServeConfig
from cluster.core.state import StateDir
from serve.access.budgets import Budgets
from serve.access.keys import load_key_hashes
from serve.adapters import AdapterSource
from serve.answers.log import AnswerLogSettings
from serve.contract.fields import Bounds


@dataclass(frozen=True)
class ServingSettings:
    key_hashes: tuple[str, ...]  # sha256 of every accepted API key; empty: an open endpoint
    contract: Bounds
    budgets: Budgets | None = None  # None: no per-caller limit
    adapters: AdapterSource | None = None  # None: the base model only
    answer_log: AnswerLogSettings | None = None  # None: the request log is off


def store_uri(cfg: ServeConfig, state: StateDir) -> str:
    """The registry's tracking URI (cluster.records.registry.tracking_uri) without making the
    default store's directory: serve.adapters.open_registry makes it in the replica."""
    return cfg.registry.tracking_uri or f"sqlite:///{state.mlflow_db}"


def adapter_source(cfg: ServeConfig, state: StateDir) -> AdapterSource | None:
    if not cfg.adapters.enabled:
        return None
    return AdapterSource(
        tracking_uri=store_uri(cfg, state),
        cache_dir=cfg.adapters.cache_dir or str(state.root / "serve" / "adapters"),
        base_id=cfg.model_id,
        base_model=cfg.model.base if cfg.adapters.same_base_only else None,
        max_lora_rank=cfg.engine.max_lora_rank,
        models=tuple(cfg.adapters.models) if cfg.adapters.models is not None else None,
        refresh_seconds=cfg.adapters.refresh_seconds,
    )


def budgets(cfg: ServeConfig) -> Budgets | None:
    auth = cfg.auth
    if not auth.rate_limit_per_minute and not auth.tokens_per_minute:
        return None
    return Budgets(
        requests_per_minute=auth.rate_limit_per_minute,
        request_burst=auth.rate_limit_burst,
        tokens_per_minute=auth.tokens_per_minute,
        max_callers=auth.max_tracked_callers,
    )


def answer_log(cfg: ServeConfig, state: StateDir) -> AnswerLogSettings | None:
    logged = cfg.request_log
    if not logged.enabled:
        return None
    return AnswerLogSettings(
        directory=logged.dir or str(state.request_log),
        retention_days=logged.retention_days,
        prompt_features=logged.prompt_features,
        prompt_text=logged.prompt_text,
    )


def serving_settings(
    cfg: ServeConfig, state: StateDir, environ: dict[str, str] | None = None
) -> ServingSettings:
    """Everything the replicas need from `cfg`, resolved against `state` (paths only)."""
    return ServingSettings(
        key_hashes=tuple(load_key_hashes(cfg.auth, environ)),
        contract=Bounds(cfg.limits, cfg.engine.max_model_len),
        budgets=budgets(cfg),
        adapters=adapter_source(cfg, state),
        answer_log=answer_log(cfg, state),
    )
