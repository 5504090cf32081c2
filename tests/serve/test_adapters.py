"""Registry adapters without Ray: the routing table, the replica-side fetch, relabelled answers.

The registry is a real SQLite one in a fresh state dir; the adapter directories it stores are
stubs (files named like an adapter's), since nothing here reads them. The endpoint tests
(test_endpoint.py) serve real adapters through the same pieces on the running app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.responses import JSONResponse, StreamingResponse

from cluster.core.serve_config import ServeConfig
from cluster.records.lineage import Lineage
from cluster.records.privacy_record import DataPrivacy
from cluster.records.registry import Registry
from serve import adapters
from serve.adapters import (
    AdapterRoute,
    AdapterSource,
    AdapterTable,
    AdapterWatcher,
    parse_engine_id,
    read_table,
)
from serve.answers.tap import MODEL_HEADER, Answerer, tapped
from serve.engine import RegistryAdapterLoader
from tests.serve.harness import register

BASE = "fedforge-tiny"


def source(registry: Registry, **kw) -> AdapterSource:
    # The table never reads cache_dir: engine replicas download into it.
    return AdapterSource(tracking_uri=registry.tracking_uri, cache_dir="", base_id=BASE, **kw)


def test_production_alias_and_versions_become_model_ids(registry, stub_adapter):
    v1 = register(registry, stub_adapter, "router")
    v2 = register(registry, stub_adapter, "router")
    other_base = register(registry, stub_adapter, "router", base_model="demo")
    register(registry, stub_adapter, "other")
    table = read_table(registry, source(registry, base_model="tiny"))
    # No `production` yet: only fixed versions; a version made for another base is left out.
    assert table.ids() == ["other:1", f"router:{v1}", f"router:{v2}"]
    assert f"router:{other_base}" not in table.ids() and not table.skipped

    def production() -> AdapterRoute:
        return read_table(registry, source(registry)).resolve("router")

    registry.promote("router", v1)
    assert production().versioned_id == f"router:{v1}"
    registry.promote("router", v2)
    assert production().versioned_id == f"router:{v2}"
    registry.rollback("router")
    assert production().versioned_id == f"router:{v1}"
    # Each route names the digest of the files registered for it: what answers say they ran.
    assert production().adapter_sha256 == registry.get("router", v1).adapter_sha256 != ""
    assert read_table(registry, source(registry, models=("other",))).ids() == ["other:1"]


def test_a_version_above_the_engines_lora_rank_is_left_out(registry, stub_adapter):
    narrow = register(registry, stub_adapter, "router", lora_rank=8)
    wide = register(registry, stub_adapter, "router", lora_rank=32)
    unknown = register(registry, stub_adapter, "router", lora_rank=None)  # predates the tag
    registry.promote("router", wide)

    table = read_table(registry, source(registry, max_lora_rank=16))
    # Not listed, and `router` (production = the wide one) resolves to nothing: a 404.
    assert table.ids() == [f"router:{narrow}", f"router:{unknown}"]
    assert table.resolve("router") is None and table.resolve(f"router:{wide}") is None
    reason = table.skipped[f"router:{wide}"]
    assert f"'router' version {wide}" in reason
    assert "rank 32" in reason and "max_lora_rank 16" in reason

    roomier = read_table(registry, source(registry, max_lora_rank=32))
    assert roomier.resolve("router").versioned_id == f"router:{wide}" and not roomier.skipped


def test_a_left_out_version_is_warned_about_once(registry, stub_adapter, caplog):
    wide = register(registry, stub_adapter, "router", lora_rank=32)
    caplog.set_level(logging.WARNING, logger="serve.adapters")
    watcher = AdapterWatcher(source(registry, max_lora_rank=16, refresh_seconds=3600))
    try:
        watcher.refresh()
        watcher.refresh()
    finally:
        watcher.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"'router' version {wide}" in warnings[0]


def test_a_registry_outage_keeps_the_last_table(registry, stub_adapter):
    register(registry, stub_adapter, "router")
    watcher = AdapterWatcher(source(registry, refresh_seconds=3600))
    try:
        assert watcher.table.ids() == ["router:1"]

        def outage():
            raise ConnectionError("registry down")

        watcher.registry.model_names = outage
        watcher.refresh()
        assert watcher.table.ids() == ["router:1"]
    finally:
        watcher.stop()


def test_engine_ids_round_trip_and_bad_ones_are_refused():
    route = AdapterRoute("router", "3")
    assert route.engine_id(BASE) == "fedforge-tiny:router:3"
    assert parse_engine_id(route.engine_id(BASE)) == route
    for bad in ("fedforge-tiny", "fedforge-tiny:router", "fedforge-tiny:router:latest"):
        with pytest.raises(ValueError, match="<base>:<name>:<version>"):
            parse_engine_id(bad)


def test_ids_list_each_alias_then_versions_by_number():
    routes = {f"a:{v}": AdapterRoute("a", str(v)) for v in (10, 2)} | {"a": AdapterRoute("a", "2")}
    assert AdapterTable(routes).ids() == ["a", "a:2", "a:10"]


def test_replicas_fetch_a_version_once_into_their_cache(registry, stub_adapter, tmp_path):
    version = register(registry, stub_adapter, "router")
    loader = RegistryAdapterLoader(registry.tracking_uri, str(tmp_path / "cache"))
    engine_id = AdapterRoute("router", version).engine_id(BASE)
    loaded = asyncio.run(loader.load_model_from_config(engine_id, None))
    assert loaded.model_id == engine_id
    files = {p.name for p in tmp_path.joinpath("cache").rglob("*") if p.is_file()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files

    def no_download(*args):
        raise AssertionError("a cached version was downloaded again")

    loader.registry.download = no_download
    assert loader.fetch(engine_id) == Path(loaded.local_path)


def test_a_failed_fetch_is_tried_again(registry, stub_adapter, tmp_path):
    version = register(registry, stub_adapter, "router")
    loader = RegistryAdapterLoader(registry.tracking_uri, str(tmp_path / "cache"), max_tries=2)
    loader.backoff_s = 0
    download, calls = loader.registry.download, []

    def flaky(*args):
        calls.append(args)
        if len(calls) == 1:
            raise OSError("connection reset")
        return download(*args)

    loader.registry.download = flaky
    engine_id = AdapterRoute("router", version).engine_id(BASE)
    assert Path(asyncio.run(loader.load_model_from_config(engine_id, None)).local_path).is_dir()
    assert len(calls) == 2


def test_ray_builds_the_loader_with_its_retry_settings(empty_state):
    """LLMServer constructs the model downloader with `download_timeout_s` and `max_tries`
    (from lora_config): the loader must take both, or no engine replica starts."""
    from ray.serve.llm import LLMServer

    from cluster.core.config import ModelSettings
    from serve.app import llm_config
    from serve.engine import registry_loader
    from serve.settings import serving_settings

    cfg = ServeConfig(model=ModelSettings(base="HuggingFaceTB/SmolLM2-135M-Instruct"))
    config = llm_config(cfg, empty_state)
    settings = serving_settings(cfg, empty_state, environ={"FEDFORGE_API_KEYS": "sk-test"})
    loader, built = registry_loader(settings.adapters), []

    def recording(**kwargs):
        built.append(loader(**kwargs))
        return built[-1]

    # Only the loader wiring (a private method: the call this test pins), on a stand-in for
    # the server: a real LLMServer instance would start an engine.
    LLMServer._init_multiplex_loader(SimpleNamespace(_llm_config=config), recording)
    (made,) = built
    assert made.max_tries >= 2 and made.timeout_s  # Ray's defaults: 3 tries, 30 s each


def test_answers_name_the_version_that_answered():
    engine_id, public = "fedforge-tiny:router:3", "router:3"
    answerer = Answerer(engine_id, public)
    answer = asyncio.run(tapped(JSONResponse({"model": engine_id, "choices": []}), answerer))
    assert json.loads(answer.body)["model"] == public and answer.headers[MODEL_HEADER] == public

    async def chunks():
        yield f'data: {{"id":"x","model":"{engine_id}","choices":[]}}\n\n'
        yield "data: [DONE]\n\n"

    async def streamed():
        response = await tapped(StreamingResponse(chunks()), answerer)
        return [chunk async for chunk in response.body_iterator]

    first, done = asyncio.run(streamed())
    assert f'"model":"{public}"' in first and done == "data: [DONE]\n\n"
    error = JSONResponse({"error": {"message": "full"}}, status_code=503)
    assert asyncio.run(tapped(error, answerer)) is error


def test_base_model_id_may_not_contain_the_version_separator():
    with pytest.raises(ValueError, match="must not contain ':'"):
        ServeConfig(model_id="base:1")


def test_a_route_carries_what_its_version_spent_of_each_data_source(registry, stub_adapter):
    spent = {
        "ab12/clients": DataPrivacy(epsilon=2.99, delta=1e-5),
        "ab12/central": DataPrivacy(epsilon=None, private=False),
    }
    lineage = Lineage(kind="federated", base_model="tiny", lora_rank=4, data_privacy=spent)
    with registry.run("serve-tests", "private", {}) as run_id:
        registry.register_adapter("private", stub_adapter, run_id, lineage, privacy_budget=6.0)
    route = read_table(registry, source(registry)).resolve("private:1")
    # The model's budget binds the data claimed private, not the central share used without DP.
    assert route.data_privacy == (
        ("ab12/central", None, False, None),
        ("ab12/clients", 2.99, True, 6.0),
    )


def test_replicas_open_a_fresh_sqlite_store_one_at_a_time(tmp_path, monkeypatch):
    """Opening a fresh SQLite store creates and migrates it: replicas starting together (here
    threads, each with its own lock file handle) take turns, and its directory is made."""
    inside, overlaps = [], []

    def slow_open(tracking_uri):
        overlaps.append(len(inside))
        inside.append(tracking_uri)
        time.sleep(0.1)
        inside.pop()

    monkeypatch.setattr(adapters, "Registry", slow_open)
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    openers = [threading.Thread(target=adapters.open_registry, args=(uri,)) for _ in range(3)]
    for opener in openers:
        opener.start()
    for opener in openers:
        opener.join()
    assert overlaps == [0, 0, 0] and (tmp_path / "fresh").is_dir()
