"""Registry adapters without Ray: the routing table, the replica-side fetch, relabelled answers.

The endpoint tests (test_endpoint.py) exercise the same pieces on the running app.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fastapi.responses import JSONResponse, StreamingResponse

from cluster.registry import Registry
from serve.adapter_loader import RegistryAdapterLoader
from serve.adapters import (
    AdapterRoute,
    AdapterSource,
    AdapterTable,
    AdapterWatcher,
    parse_engine_id,
    read_table,
)
from cluster.serve_config import ServeConfig
from serve.relabel import MODEL_HEADER, relabel
from tests.serve.conftest import register

BASE = "fedforge-tiny"


@pytest.fixture
def registry(state) -> Registry:
    return Registry(state.default_tracking_uri(), state.mlflow_artifacts)


def source(registry: Registry, **kw) -> AdapterSource:
    return AdapterSource(tracking_uri=registry.tracking_uri, base_id=BASE, **kw)


def test_production_alias_and_versions_become_model_ids(registry, tiny_adapters):
    v1 = register(registry, tiny_adapters[0], "router")
    v2 = register(registry, tiny_adapters[1], "router")
    other_base = register(registry, tiny_adapters[0], "router", base_model="demo")
    register(registry, tiny_adapters[0], "other")
    table = read_table(registry, source(registry, base_model="tiny"))
    # No `production` yet: only fixed versions; a version made for another base is left out.
    assert table.ids() == ["other:1", f"router:{v1}", f"router:{v2}"]
    assert f"router:{other_base}" not in table.ids()

    registry.promote("router", v1)
    assert read_table(registry, source(registry)).resolve("router") == AdapterRoute("router", v1)
    registry.promote("router", v2)
    assert read_table(registry, source(registry)).resolve("router") == AdapterRoute("router", v2)
    registry.rollback("router")
    assert read_table(registry, source(registry)).resolve("router") == AdapterRoute("router", v1)
    assert read_table(registry, source(registry, models=("other",))).ids() == ["other:1"]


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


def test_a_registry_outage_keeps_the_last_table(registry, tiny_adapters):
    register(registry, tiny_adapters[0], "router")
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


def test_replicas_fetch_a_version_once_into_their_cache(registry, tiny_adapters, tmp_path):
    version = register(registry, tiny_adapters[0], "router")
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


def test_answers_name_the_version_that_answered():
    engine_id, public = "fedforge-tiny:router:3", "router:3"
    answer = relabel(JSONResponse({"model": engine_id, "choices": []}), engine_id, public)
    assert json.loads(answer.body)["model"] == public and answer.headers[MODEL_HEADER] == public

    async def chunks():
        yield f'data: {{"id":"x","model":"{engine_id}","choices":[]}}\n\n'
        yield "data: [DONE]\n\n"

    async def collect(response):
        return [chunk async for chunk in response.body_iterator]

    streamed = relabel(StreamingResponse(chunks()), engine_id, public)
    first, done = asyncio.run(collect(streamed))
    assert f'"model":"{public}"' in first and done == "data: [DONE]\n\n"
    error = JSONResponse({"error": {"message": "full"}}, status_code=503)
    assert relabel(error, engine_id, public) is error


def test_base_model_id_may_not_contain_the_version_separator():
    with pytest.raises(ValueError, match="must not contain ':'"):
        ServeConfig(model_id="base:1")
