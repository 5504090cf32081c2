"""The engine replica: Ray Serve LLM's `LLMServer` with registry adapters and a faster CPU start.

Plugged in through Ray Serve LLM's extension points (`LLMConfig.server_cls`, `callback_config`):
- adapters come from the registry (`RegistryAdapterLoader` as the server's model downloader);
- a model that is a local directory skips the per-node "download" task, a fresh Ray worker that
  imports vLLM only to hand back the same path (~7 s of every cold start on a 2-core node);
- a single CPU engine runs its model worker inside vLLM's EngineCore process (the "uni"
  executor, what `vllm serve` does at world size 1). Ray Serve LLM forces the multiprocess
  executor on CPU, which spawns one more vLLM process at start (~7 s here) and hands every
  decode step across processes.

Registry adapters without a cloud bucket: Ray Serve LLM 2.60 fetches adapters from
`lora_config.dynamic_lora_loading_path`, which must be an s3/gs/azure URI (local paths fail an
assert). Its `LLMServer` takes the fetching class as an argument (`model_downloader`), so
`EngineServer` hands it `RegistryAdapterLoader`, which downloads the registry version named by
the multiplexed id (`<base>:<name>:<version>`, see serve.adapters) into a local cache. With an
MLflow server as the registry (`registry.tracking_uri`) this works on every node; with the
default SQLite registry, on the node that holds the state dir.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

from mlflow.exceptions import MlflowException
from ray.serve.llm import LLMConfig, LLMServer

from cluster.core.credentials import redact
from serve.adapters import AdapterSource, open_registry, parse_engine_id
from serve.ray_internal import CallbackBase, DiskMultiplexConfig, VLLMEngine, global_id_manager
from serve.settings import ServingSettings

log = logging.getLogger(__name__)


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


class RegistryAdapterLoader:
    """Ray Serve LLM's `model_downloader` contract: `load_model_from_config(id, llm_config)`.

    `LLMServer` constructs it with `download_timeout_s` and `max_tries` from the app's
    `lora_config` (Ray's defaults: 30 s, 3 tries); a fetch that times out or fails is tried
    again after a doubling pause. A version's files never change, so each is downloaded once
    per node into a directory named after its unique artifact path, written to a temporary name
    and renamed into place.
    """

    backoff_s = 1.0  # the first pause between tries

    def __init__(
        self,
        tracking_uri: str,
        cache_dir: str,
        *,
        download_timeout_s: float | None = None,
        max_tries: int = 1,
    ):
        self.registry = open_registry(tracking_uri)
        self.cache_dir = Path(cache_dir)
        self.timeout_s = download_timeout_s
        self.max_tries = max(1, max_tries)

    async def load_model_from_config(
        self, lora_model_id: str, llm_config: LLMConfig
    ) -> DiskMultiplexConfig:
        started = time.monotonic()
        for attempt in range(1, self.max_tries + 1):
            try:
                path = await asyncio.wait_for(
                    asyncio.to_thread(self.fetch, lora_model_id), self.timeout_s
                )
                break
            except (OSError, TimeoutError, MlflowException) as exc:
                if attempt == self.max_tries:
                    raise
                log.warning("fetching %s failed (%s); retrying", lora_model_id, redact(exc))
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
        log.info("adapter %s ready in %.2f s", lora_model_id, time.monotonic() - started)
        return DiskMultiplexConfig(
            model_id=lora_model_id,
            max_total_tokens=None,
            local_path=str(path),
            lora_assigned_int_id=global_id_manager.next(),
        )

    def fetch(self, lora_model_id: str) -> Path:
        """The version's adapter directory in the local cache, downloaded if missing."""
        route = parse_engine_id(lora_model_id)
        version = self.registry.get(route.name, route.version)
        target = self.cache_dir / route.name / f"v{route.version}-{version.artifact_path}"
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            downloaded = self.registry.download(route.name, route.version, staging)
            try:
                downloaded.rename(target)
            except OSError:  # another request of this replica or node got there first
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


def registry_loader(adapters: AdapterSource | None) -> partial | None:
    """The model downloader reading this app's registry (None without adapters). LLMServer
    calls it with its retry settings: `(download_timeout_s=..., max_tries=...)`."""
    if adapters is None:
        return None
    return partial(RegistryAdapterLoader, adapters.tracking_uri, adapters.cache_dir)


class EngineServer(LLMServer):
    async def __init__(self, llm_config: LLMConfig, *, settings: ServingSettings, **kwargs):
        kwargs.setdefault("engine_cls", InProcessCPUEngine)
        if "model_downloader" not in kwargs and (loader := registry_loader(settings.adapters)):
            kwargs["model_downloader"] = loader
        await super().__init__(llm_config, **kwargs)
