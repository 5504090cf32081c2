"""Engine replicas load LoRA adapters straight from the registry, without a cloud bucket.

Ray Serve LLM 2.60 fetches adapters from `lora_config.dynamic_lora_loading_path`, which must be
an s3/gs/azure URI (local paths fail an assert). Its `LLMServer` takes the fetching class as an
argument (`model_downloader`) and `LLMConfig.server_cls` names the server class, so this module
plugs in there: `serve.engine.EngineServer` is the stock server with `RegistryAdapterLoader`, which
downloads the registry version named by the multiplexed id (`<base>:<name>:<version>`, see
serve.adapters) into a local cache. With an MLflow server as the registry (`registry.tracking_uri`)
this works on every node; with the default SQLite registry, on the node that holds the state dir.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from pathlib import Path

from mlflow.exceptions import MlflowException
from ray.serve.llm import LLMConfig

from cluster.core.credentials import redact
from cluster.records.registry import Registry
from serve.adapters import parse_engine_id
from serve.ray_internal import DiskMultiplexConfig, global_id_manager

log = logging.getLogger(__name__)
# Key of LLMConfig.experimental_configs carrying {tracking_uri, cache_dir} to the replicas.
STORE_KEY = "fedforge_adapter_store"


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
        self.registry = Registry(tracking_uri)
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
