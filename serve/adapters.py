"""Which registry adapters the endpoint serves, and under which model ids.

Public ids (what clients pass as `model`): `<name>` is the version the registry's `production`
alias points at; `<name>:<version>` is that version, fixed. Engine ids (what the ingress hands
to Ray Serve LLM) are `<base id>:<name>:<version>`: Ray's multiplexed LoRA id, one per
registered version and never reused. The engine and Serve never reload an id they already hold,
so a promote or rollback never overwrites anything: the ingress re-reads the aliases every
`adapters.refresh_seconds` and routes `<name>` to another engine id.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, field

from cluster.lineage import TAG_PREFIX
from cluster.registry import PRODUCTION, Registry

log = logging.getLogger(__name__)
BASE_MODEL_TAG = TAG_PREFIX + "base_model"


@dataclass(frozen=True)
class AdapterRoute:
    name: str
    version: str

    @property
    def versioned_id(self) -> str:
        return f"{self.name}:{self.version}"

    def engine_id(self, base_id: str) -> str:
        return f"{base_id}:{self.versioned_id}"


def parse_engine_id(engine_id: str) -> AdapterRoute:
    """`<base>:<name>:<version>` back to its route (a replica loading an adapter needs it)."""
    parts = engine_id.rsplit(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2].isdigit():
        raise ValueError(f"'{engine_id}' is not an adapter id of the form <base>:<name>:<version>")
    return AdapterRoute(parts[1], parts[2])


@dataclass(frozen=True)
class AdapterTable:
    """One snapshot of the registry: public id -> route. Replaced whole, never mutated."""

    routes: dict[str, AdapterRoute] = field(default_factory=dict)

    def resolve(self, model: str) -> AdapterRoute | None:
        return self.routes.get(model)

    def ids(self) -> list[str]:
        """Each `<name>`, then its versions by number (`<name>:2` before `<name>:10`)."""

        def order(model_id: str) -> tuple[str, bool, int]:
            route = self.routes[model_id]
            return route.name, model_id != route.name, int(route.version)

        return sorted(self.routes, key=order)


@dataclass(frozen=True)
class AdapterSource:
    """What the ingress needs to read the table: plain values, so it pickles to any node."""

    tracking_uri: str
    base_id: str
    base_model: str | None = None  # skip versions tagged with another base; None: keep all
    models: tuple[str, ...] | None = None
    refresh_seconds: float = 10.0


@functools.cache  # the table is re-read every few seconds: say it once per name
def _warn_unservable(name: str) -> None:
    log.warning("registered model '%s' is not served: its name is not a usable model id", name)


def _servable_name(name: str, source: AdapterSource) -> bool:
    if ":" in name or name == source.base_id:
        _warn_unservable(name)
        return False
    return source.models is None or name in source.models


def read_table(registry: Registry, source: AdapterSource) -> AdapterTable:
    routes: dict[str, AdapterRoute] = {}
    for name in registry.model_names():
        if not _servable_name(name, source):
            continue
        servable = {
            str(v.version)
            for v in registry.versions(name)
            if source.base_model is None
            or v.tags.get(BASE_MODEL_TAG, source.base_model) == source.base_model
        }
        for version in servable:
            routes[f"{name}:{version}"] = AdapterRoute(name, version)
        production = registry.aliases(name).get(PRODUCTION)
        if production in servable:
            routes[name] = AdapterRoute(name, production)
    return AdapterTable(routes)


class AdapterWatcher:
    """Keeps `table` current: a daemon thread re-reads the registry every refresh interval.

    Registry calls block (SQLite or HTTP), so they run off the ingress' event loop. A failed read
    keeps the last good table and logs; the endpoint never stops serving for a registry outage.
    """

    def __init__(self, source: AdapterSource):
        self.source = source
        self.registry = Registry(source.tracking_uri)
        self.table = AdapterTable()
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="adapter-watcher", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        try:
            table = read_table(self.registry, self.source)
        except Exception:  # the registry is down or mid-migration: keep serving the last table
            log.exception("reading adapters from the registry failed; keeping the last table")
            return
        if table != self.table:
            log.info("serving adapters: %s", ", ".join(table.ids()) or "none")
        self.table = table

    def _run(self) -> None:
        while not self._stop.wait(self.source.refresh_seconds):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
