"""Which registry adapters the endpoint serves, and under which model ids.

Public ids (what clients pass as `model`): `<name>` is the version the registry's `production`
alias points at; `<name>:<version>` is that version, fixed. Engine ids (what the ingress hands
to Ray Serve LLM) are `<base id>:<name>:<version>`: Ray's multiplexed LoRA id, one per
registered version and never reused. The engine and Serve never reload an id they already hold,
so a promote or rollback never overwrites anything: the ingress re-reads the aliases every
`adapters.refresh_seconds` and routes `<name>` to another engine id.

A version the engine could not load (trained on another base model, or of a LoRA rank above
`engine.max_lora_rank`) is left out of the table: not listed, and asking for it is a 404 like any
unknown id, instead of failing in the engine. A left-out rank is warned about once.
"""

from __future__ import annotations

import fcntl
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cluster.core.credentials import redact
from cluster.records.lineage import Lineage
from cluster.records.registry import PRODUCTION, Registry, VersionRecord

log = logging.getLogger(__name__)
# What Lineage reads for a version registered without a base model: it may be any base.
UNKNOWN_BASE = Lineage.from_tags({}).base_model


@dataclass(frozen=True)
class AdapterRoute:
    name: str
    version: str
    # What the version's ancestry spent of each data source against its model's budget:
    # (source, epsilon, private, budget); epsilon None = no guarantee (used without DP); budget
    # None = none binds (no budget set, or data never claimed private). Shown on /v1/models.
    data_privacy: tuple[tuple[str, float | None, bool, float | None], ...] = ()
    adapter_sha256: str = ""  # of the registered files; "" for versions registered without it

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
    """One snapshot of the registry: public id -> route, and why each left-out id is left out.

    Replaced whole, never mutated."""

    routes: dict[str, AdapterRoute] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name or `<name>:<version>` -> why

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
    """Where adapters come from and which are served: plain values, so it pickles to any node.
    The ingress reads the table with it, engine replicas fetch versions into `cache_dir`."""

    tracking_uri: str
    cache_dir: str
    base_id: str
    base_model: str | None = None  # skip versions trained on another base; None: keep all
    max_lora_rank: int | None = None  # skip versions of a higher LoRA rank; None: keep all
    models: tuple[str, ...] | None = None
    refresh_seconds: float = 10.0


def open_registry(tracking_uri: str) -> Registry:
    """The registry at `tracking_uri`, opened at replica start by one process of a host at a time.

    Opening a fresh SQLite store creates and migrates it, and replicas starting together would
    race on that migration (alembic fails for all but one): each opens it under a lock beside
    the database file, so the first migrates and the others find it done. A server migrates its
    own store."""
    db = tracking_uri.removeprefix("sqlite:///")
    if db == tracking_uri:
        return Registry(tracking_uri)
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.open.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return Registry(tracking_uri)


def _unservable_name(name: str, source: AdapterSource) -> str | None:
    """Why no version of `name` can be served under its name, or None."""
    if ":" in name or name == source.base_id:
        return f"registered model '{name}' is not served: its name is not a usable model id"
    return None


def _unservable_version(version: VersionRecord, source: AdapterSource) -> str | None:
    """Why the engine cannot load `version`, or None. A lineage without the value passes."""
    rank = version.lineage.lora_rank
    if source.max_lora_rank is not None and rank is not None and rank > source.max_lora_rank:
        return (
            f"'{version.name}' version {version.version} is not served: its LoRA rank {rank} "
            f"exceeds the engine's max_lora_rank {source.max_lora_rank} (raise "
            "engine.max_lora_rank in the serve config to serve it)"
        )
    return None


def _same_base(version: VersionRecord, source: AdapterSource) -> bool:
    base = version.lineage.base_model
    return source.base_model is None or base in (source.base_model, UNKNOWN_BASE)


def read_table(registry: Registry, source: AdapterSource) -> AdapterTable:
    routes: dict[str, AdapterRoute] = {}
    skipped: dict[str, str] = {}
    for name in registry.model_names():
        if source.models is not None and name not in source.models:
            continue
        if reason := _unservable_name(name, source):
            skipped[name] = reason
            continue
        servable: dict[str, AdapterRoute] = {}
        budget = registry.privacy_budget(name)
        for version in registry.versions(name):
            if not _same_base(version, source):
                continue  # made for another base model: not this endpoint's, nothing to say
            if reason := _unservable_version(version, source):
                skipped[f"{name}:{version.version}"] = reason
            else:
                spent = tuple(
                    (data, p.epsilon, p.private, budget if p.private else None)
                    for data, p in sorted(version.lineage.data_privacy.items())
                )
                servable[version.version] = AdapterRoute(
                    name, version.version, spent, version.adapter_sha256
                )
        for version, route in servable.items():
            routes[f"{name}:{version}"] = route
        production = registry.aliases(name).get(PRODUCTION)
        if production in servable:
            routes[name] = servable[production]
    return AdapterTable(routes, skipped)


class AdapterWatcher:
    """Keeps `table` current: a daemon thread re-reads the registry every refresh interval.

    Registry calls block (SQLite or HTTP), so they run off the ingress' event loop. A failed read
    keeps the last good table and logs; the endpoint never stops serving for a registry outage.
    """

    def __init__(self, source: AdapterSource):
        self.source = source
        self.registry = open_registry(source.tracking_uri)
        self.table = AdapterTable()
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="adapter-watcher", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        try:
            table = read_table(self.registry, self.source)
        except Exception as exc:  # the registry is down or mid-migration: keep the last table
            # Not log.exception: the traceback's text may repeat a tracking URI's credentials.
            log.error(
                "reading adapters from the registry failed (%s: %s); keeping the last table",
                type(exc).__name__,
                redact(exc),
            )
            return
        for model_id in sorted(table.skipped.keys() - self.table.skipped.keys()):
            log.warning(table.skipped[model_id])  # once, not at every refresh
        if table.routes != self.table.routes:
            log.info("serving adapters: %s", ", ".join(table.ids()) or "none")
        self.table = table

    def _run(self) -> None:
        while not self._stop.wait(self.source.refresh_seconds):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
