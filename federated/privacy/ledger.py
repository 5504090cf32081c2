"""The privacy ledger: every accounted release of a run, kept so that epsilon never under-reports.

Two ledgers, both append-only and both written before anything they account is released:

- The server's (`<run>/privacy-ledger.jsonl`, `ServerLedger`): a round *attempt* is logged, with
  its absolute round, noise multiplier and sampled nodes, before any client is asked; every
  reply (kept, rejected or failed) is logged as it arrives; the attempt is marked done only
  after its round is saved. A crash anywhere leaves an attempt that is charged again when the
  run resumes and re-runs that round. The run's epsilon comes from this ledger. A last line a
  crash cut short is replaced by a `torn` event before anything is appended (the attempt it
  belonged to, or may have started, is charged as unfinished); any other line that does not
  parse stops the run (`LedgerError`): an event that vanished could under-report epsilon.
- Each client's (`ClientState.ledger` in Flower's `context.state`): one `Charge` per attempt it
  trained in, at its own sampling rate, written before it replies. The server sends every
  earlier attempt of the run (`TrainTask.schedule`); attempts a client has no record of (its
  SuperNode restarted, or the whole job did) are charged as if it had trained in them.

Light imports only (no torch, no Opacus): ClientApps import this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from cluster.core.errors import UserError
from cluster.records.privacy_record import sample_rate  # noqa: F401 - where the clients' code finds it

History = list[tuple[float, float, int]]  # Opacus' accountant: (noise_multiplier, rate, steps)

OUTSIDE_PREFIX = "outside-"  # an outside client's ledger name: outside-<Flower node id>


def in_cluster_client(partition: int) -> str:
    return str(partition)


def outside_client(node_id: int) -> str:
    return f"{OUTSIDE_PREFIX}{node_id}"


@dataclass(frozen=True)
class Attempt:
    """One try at an absolute round: what the server planned for it (a re-run round is a new
    attempt of the same round, and is charged again)."""

    attempt: int
    round: int
    noise: float | None  # None without DP


@dataclass(frozen=True)
class Charge:
    """One release accounted for one client: `steps` DP-SGD steps (or one central release)."""

    attempt: int
    round: int
    noise: float
    rate: float
    steps: int
    assumed: bool = False  # charged without a record of training (worst case), not measured


def history_of(charges: Iterable[Charge]) -> History:
    return [(c.noise, c.rate, c.steps) for c in charges]


def client_charges(
    recorded: list[Charge], schedule: list[Attempt], current: Attempt, rate: float, steps: int
) -> list[Charge]:
    """A client's ledger after training in `current`: its own records, every earlier attempt
    of the run it has no record of charged as if it had trained (`assumed`), then `current`."""
    seen = {c.attempt for c in recorded}
    filled = list(recorded)
    for earlier in schedule:
        unknown = earlier.attempt not in seen and earlier.attempt != current.attempt
        if unknown and earlier.noise is not None:
            filled.append(Charge(earlier.attempt, earlier.round, earlier.noise, rate, steps, True))
    filled.sort(key=lambda c: c.attempt)
    return [*filled, Charge(current.attempt, current.round, current.noise, rate, steps)]


# -- the server's ledger --------------------------------------------------------------------


class _Started(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    event: Literal["started"] = "started"
    attempt: int
    round: int
    noise: float | None
    steps: int  # accounted steps per trained client: local_steps (local DP), 1 (central DP)
    sampled: list[int]  # Flower node ids asked to train


class _Reply(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    event: Literal["reply"] = "reply"
    attempt: int
    node: int
    client: str | None  # who it said it was (None: a failed or unreadable reply)
    rate: float | None  # its sampling rate as the server computes it
    status: Literal["kept", "rejected", "failed"]


class _Done(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    event: Literal["done"] = "done"
    attempt: int
    round: int


class _Torn(BaseModel):
    """A last line a crash cut short, removed: its attempt is charged as one that never finished
    (and, if the line may have started it, at the run's smallest noise and most steps)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    event: Literal["torn"] = "torn"
    attempt: int  # the attempt the cut line belonged to, or may have started
    opened: bool  # the cut line may have started `attempt` (its round and noise are lost)
    dropped: int  # bytes removed


Event = _Started | _Reply | _Done | _Torn
_EVENT = TypeAdapter(Event)
# Cut lines recognisably of an open attempt; any other may have started a new one.
_CLOSING = (b'{"event":"reply"', b'{"event":"done"')


class LedgerError(UserError):
    """The ledger cannot be trusted to hold every release (a line lost, a round never logged)."""


def _last_attempt(events: list[Event]) -> int:
    return max((e.attempt for e in events if e.event in ("started", "torn")), default=0)


def _torn(events: list[Event], tail: bytes) -> _Torn:
    """The event a cut last line `tail` stands for, after the whole `events` before it."""
    last = _last_attempt(events)
    opened = not tail.startswith(_CLOSING) or last == 0
    return _Torn(attempt=last + 1 if opened else last, opened=opened, dropped=len(tail))


def _releases(events: list[Event]) -> list[tuple[_Started, bool]]:
    """(attempt, assumed) for every attempt with DP that may have released: the started ones,
    and each one a cut line may have started (its noise unknown: the run's smallest; its round
    unknown: 0)."""
    started = [e for e in events if e.event == "started" and e.noise is not None]
    opened = [e.attempt for e in events if e.event == "torn" and e.opened]
    if not started:
        return []
    noise, steps = min(s.noise for s in started), max(s.steps for s in started)
    guessed = [_Started(attempt=a, round=0, noise=noise, steps=steps, sampled=[]) for a in opened]
    releases = [(s, False) for s in started] + [(g, True) for g in guessed]
    return sorted(releases, key=lambda release: release[0].attempt)


def _line(event: BaseModel) -> bytes:
    return (event.model_dump_json() + "\n").encode()


class ServerLedger:
    """The server's append-only ledger of one run (see the module docstring)."""

    FILE = "privacy-ledger.jsonl"

    def __init__(self, root: Path) -> None:
        self.path = root / self.FILE

    def _append(self, event: BaseModel) -> None:
        self.repair()  # else the event would merge into a cut line, and be lost with it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            f.write(_line(event))
            f.flush()
            os.fsync(f.fileno())  # durable before the release it accounts happens

    def _read(self) -> tuple[list[Event], int, bytes]:
        """The whole lines' events, where they end, and the cut last line after them."""
        data = self.path.read_bytes() if self.path.exists() else b""
        end = data.rfind(b"\n") + 1
        events = []
        for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
            try:
                events.append(_EVENT.validate_json(line))
            except ValidationError:
                raise LedgerError(
                    f"{self.path}, line {number}: not a ledger event; an event lost there "
                    "could under-report epsilon, so this run's privacy cannot be accounted: "
                    "start a new run (a new name)"
                ) from None
        return events, end, data[end:]

    def events(self) -> list[Event]:
        """Every event; a cut last line reads as the `torn` event `repair` replaces it with."""
        events, _, tail = self._read()
        return [*events, _torn(events, tail)] if tail else events

    def repair(self) -> None:
        """Replace a last line a crash cut short by its `torn` event, in place (a crash in
        between leaves a cut line again, repaired the same way)."""
        events, end, tail = self._read()
        if not tail:
            return
        with self.path.open("r+b") as f:
            f.seek(end)
            f.write(_line(_torn(events, tail)))
            f.truncate()
            f.flush()
            os.fsync(f.fileno())

    def attempts(self) -> list[Attempt]:
        """The started attempts (what clients are told of; a cut one is charged by the server)."""
        return [Attempt(e.attempt, e.round, e.noise) for e in self.events() if e.event == "started"]

    def start(
        self, server_round: int, noise: float | None, steps: int, sampled: list[int]
    ) -> Attempt:
        attempt = _last_attempt(self.events()) + 1  # after any a cut line may have started
        self._append(
            _Started(attempt=attempt, round=server_round, noise=noise, steps=steps, sampled=sampled)
        )
        return Attempt(attempt, server_round, noise)

    def reply(
        self, attempt: Attempt, node: int, client: str | None, rate: float | None, status: str
    ) -> None:
        self._append(
            _Reply(attempt=attempt.attempt, node=node, client=client, rate=rate, status=status)
        )

    def done(self, attempt: Attempt) -> None:
        self._append(_Done(attempt=attempt.attempt, round=attempt.round))

    def check_started(self, rounds: Iterable[int]) -> None:
        """Refuse (LedgerError) when a saved round has no started attempt here: the ledger
        lost the release that produced it."""
        started = {e.round for e in self.events() if e.event == "started"}
        if lost := sorted(set(rounds) - started):
            raise LedgerError(
                f"{self.path}: rounds {lost} were saved but no attempt at them was logged: the "
                "ledger lost a release, so this run's privacy cannot be accounted; start a new "
                "run (a new name)"
            )

    def bindings(self) -> dict[str, int]:
        """Each client's node: the node of its latest kept reply (a partition moves to another
        node only once its node left)."""
        return {
            e.client: e.node
            for e in self.events()
            if e.event == "reply" and e.status == "kept" and e.client is not None
        }

    def charges(
        self, in_cluster_rates: Mapping[str, float], central: bool = False
    ) -> dict[str, list[Charge]]:
        """Every client's charges, worst case where the server cannot know better.

        - Central DP: one release of the aggregate per attempt covers every client's data, at
          rate 1 (no amplification by client sampling is claimed).
        - Local DP, an in-cluster client: every attempt, whether or not it replied (its reply
          may have been lost, rejected or never sent after it trained): what the plan assumes.
        - Local DP, an outside client: every attempt it replied in (kept or rejected: the
          server saw it), and, from its first reply on, every attempt that never finished or
          in which its node failed; at the largest rate it was ever charged at.
        - An attempt a cut line belonged to: every outside client ever seen (the cut line may
          have been its first reply).
        """
        events = self.events()
        replies = [e for e in events if e.event == "reply"]
        finished = {e.attempt for e in events if e.event == "done"}
        torn = {e.attempt for e in events if e.event == "torn"}
        outside = _outside_rates(replies)
        charges: dict[str, list[Charge]] = {}
        for s, assumed in _releases(events):
            if central:
                rates = dict.fromkeys([*in_cluster_rates, *outside], 1.0)
            else:
                rates = dict(in_cluster_rates)
                for name, rate in outside.items():
                    if s.attempt in torn or _outside_charged(name, s.attempt, replies, finished):
                        rates[name] = rate
            for name, rate in rates.items():
                charges.setdefault(name, []).append(
                    Charge(s.attempt, s.round, s.noise, rate, s.steps, assumed)
                )
        return charges

    def done_rounds(self) -> set[int]:
        return {e.round for e in self.events() if e.event == "done"}


def _outside_nodes(replies: list[_Reply]) -> dict[int, str]:
    return {r.node: r.client for r in replies if r.client and r.client.startswith(OUTSIDE_PREFIX)}


def _outside_rates(replies: list[_Reply]) -> dict[str, float]:
    """Each outside client's largest rate charged in any reply."""
    names = set(_outside_nodes(replies).values())
    rates: dict[str, float] = {}
    for r in replies:
        if r.client in names and r.rate is not None:
            rates[r.client] = max(rates.get(r.client, 0.0), r.rate)
    return rates


def _outside_charged(name: str, attempt: int, replies: list[_Reply], finished: set[int]) -> bool:
    """Local DP: whether outside client `name` is charged for `attempt` (see `charges`)."""
    nodes = _outside_nodes(replies)
    here = [r for r in replies if r.attempt == attempt]
    replied = any(r.status != "failed" and name in (r.client, nodes.get(r.node)) for r in here)
    node_failed = any(r.status == "failed" and nodes.get(r.node) == name for r in here)
    first = min(r.attempt for r in replies if r.client == name)
    return replied or (attempt >= first and (attempt not in finished or node_failed))
