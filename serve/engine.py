"""The engine replica: Ray Serve LLM's `LLMServer` with registry adapters and a faster CPU start.

Plugged in through Ray Serve LLM's extension points (`LLMConfig.server_cls`, `callback_config`):
- adapters come from the registry (`RegistryAdapterLoader` as the server's model downloader);
- a model that is a local directory skips the per-node "download" task, a fresh Ray worker that
  imports vLLM only to hand back the same path (~7 s of every cold start on a 2-core node);
- a single CPU engine runs its model worker inside vLLM's EngineCore process (the "uni"
  executor, what `vllm serve` does at world size 1). Ray Serve LLM forces the multiprocess
  executor on CPU, which spawns one more vLLM process at start (~7 s here) and hands every
  decode step across processes.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from ray.serve.llm import LLMConfig, LLMServer

from serve.adapter_loader import STORE_KEY, RegistryAdapterLoader
from serve.ray_internal import CallbackBase, VLLMEngine


class LocalModelCallback(CallbackBase):
    """Skips node initialization when the model is already a directory on this node."""

    async def on_before_node_init(self) -> None:
        source = self.llm_config.get_engine_config().actual_hf_model_id
        if Path(source).is_dir():
            self.ctx.run_init_node = False


class InProcessCPUEngine(VLLMEngine):
    def _start_async_llm_engine(self, vllm_engine_args, vllm_engine_config, placement_group):
        parallel = vllm_engine_config.parallel_config
        if vllm_engine_config.device_config.device_type == "cpu" and parallel.world_size == 1:
            parallel.distributed_executor_backend = "uni"
        return super()._start_async_llm_engine(
            vllm_engine_args, vllm_engine_config, placement_group
        )


def registry_loader(llm_config: LLMConfig) -> partial | None:
    """The model downloader reading this app's registry (None without adapters). LLMServer
    calls it with its retry settings: `(download_timeout_s=..., max_tries=...)`."""
    store = llm_config.experimental_configs.get(STORE_KEY)
    if not store:
        return None
    return partial(RegistryAdapterLoader, store["tracking_uri"], store["cache_dir"])


class EngineServer(LLMServer):
    async def __init__(self, llm_config: LLMConfig, **kwargs):
        kwargs.setdefault("engine_cls", InProcessCPUEngine)
        if "model_downloader" not in kwargs and (loader := registry_loader(llm_config)):
            kwargs["model_downloader"] = loader
        await super().__init__(llm_config, **kwargs)
