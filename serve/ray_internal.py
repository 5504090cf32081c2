"""The one door to Ray's private API (`ray.llm._internal`): every such name serve/ uses, and why.

Ray may move these in any release. Each is fetched by `_private`, so after an upgrade the import
of this module fails with the moved symbol's full name and what fedforge needs it for, instead of
a bare ImportError somewhere in an engine replica. tests/serve/test_ray_internal.py imports it.
"""

from __future__ import annotations

import importlib
from typing import Any

import ray

PACKAGE = "ray.llm._internal"
__all__ = [
    "CallbackBase",
    "DEFAULT_ENDPOINTS",
    "DiskMultiplexConfig",
    "ModelCard",
    "ModelList",
    "OpenAIHTTPException",
    "VLLMEngine",
    "fastapi_app",
    "global_id_manager",
    "to_model_metadata",
]


def _private(module: str, name: str, used_for: str) -> Any:
    """`PACKAGE.module.name`, or an ImportError naming it and what fedforge uses it for."""
    path = f"{PACKAGE}.{module}"
    try:
        return getattr(importlib.import_module(path), name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            f"{path}.{name} is gone in ray {ray.__version__} (fedforge uses it {used_for}); "
            "find where it moved and update serve/ray_internal.py"
        ) from exc


# Each name with the reason fedforge needs it (also the message if it moves).
DiskMultiplexConfig = _private(
    "serve.core.configs.llm_config",
    "DiskMultiplexConfig",
    "as the record serve.engine.RegistryAdapterLoader hands Ray's LoRA multiplexer",
)
global_id_manager = _private(
    "common.models",
    "global_id_manager",
    "for the per-process LoRA int ids vLLM needs, drawn from the counter Ray's own loader uses",
)
to_model_metadata = _private(
    "serve.core.configs.openai_api_models",
    "to_model_metadata",
    "to build the base model's card in serve.app as the stock ingress does",
)
DEFAULT_ENDPOINTS = _private(
    "serve.core.ingress.ingress",
    "DEFAULT_ENDPOINTS",
    "as the stock OpenAI route table that serve.ingress extends with /health",
)
fastapi_app = _private(
    "serve.core.ingress.ingress",
    "init",
    "to build the ingress's FastAPI app with Ray's own middleware (request ids, metrics), "
    "which serve.ingress then strips of its API docs",
)
ModelCard = _private(
    "serve.core.configs.openai_api_models",
    "ModelCard",
    "for adapter entries in /v1/models (Ray exports no public alias)",
)
ModelList = _private(
    "serve.core.configs.openai_api_models",
    "ModelList",
    "as the /v1/models response (Ray exports no public alias)",
)
OpenAIHTTPException = _private(
    "serve.core.configs.openai_api_models",
    "OpenAIHTTPException",
    "to map the engine's refusals, which the stock ingress re-raises as it, "
    "in serve.answers.errors",
)
CallbackBase = _private(
    "common.callbacks.base",
    "CallbackBase",
    "as the base of serve.engine.LocalModelCallback (skips node init for local models)",
)
VLLMEngine = _private(
    "serve.engines.vllm.vllm_engine",
    "VLLMEngine",
    "as the base of serve.engine.InProcessCPUEngine (the in-process CPU model worker)",
)
