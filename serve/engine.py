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

from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
from ray.serve.llm import LLMConfig, LLMServer

from serve.adapter_loader import STORE_KEY, RegistryAdapterLoader


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


class EngineServer(LLMServer):
    async def __init__(self, llm_config: LLMConfig, **kwargs):
        kwargs.setdefault("engine_cls", InProcessCPUEngine)
        store = llm_config.experimental_configs.get(STORE_KEY)
        if store and "model_downloader" not in kwargs:
            kwargs["model_downloader"] = partial(
                RegistryAdapterLoader, store["tracking_uri"], store["cache_dir"]
            )
        await super().__init__(llm_config, **kwargs)
