"""The privacy ledger: every accounted release of a run, kept so that epsilon never under-reports.

Two ledgers, both append-only and both written before anything they account is released:

- The server's (`<run>/privacy-ledger.jsonl`, `ServerLedger`): a round *attempt* is logged, with
  its absolute round, noise multiplier and sampled nodes, before any client is asked; every
  reply (kept, rejected or failed) is logged as it arrives; the attempt is marked done only
  after its round is saved. A crash anywhere leaves an attempt that is charged again when the
  run resumes and re-runs that round. The run's epsilon comes from this ledger.
- Each client's (`ClientState.ledger` in Flower's `context.state`): one `Charge` per attempt it
  trained in, at its own sampling rate, written before it replies. The server sends every
  earlier attempt of the run (`TrainTask.schedule`); attempts a client has no record of (its
  SuperNode restarted, or the whole job did) are charged as if it had trained in them.

Light imports only (no torch, no Opacus): ClientApps import this module.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

History = list[tuple[float, float, int]]  # Opacus' accountant: (noise_multiplier, rate, steps)

OUTSIDE_PREFIX = "outside-"  # an outside client's ledger name: outside-<Flower node id>


def sample_rate(n_examples: int, batch_size: int) -> float:
    """Poisson sampling rate Opacus' DPDataLoader derives from a DataLoader (1 / len(loader))."""
    return 1 / math.ceil(n_examples / batch_size)


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


_EVENT = TypeAdapter(_Started | _Reply | _Done)


class ServerLedger:
    """The server's append-only ledger of one run (see the module docstring)."""

    FILE = "privacy-ledger.jsonl"

    def __init__(self, root: Path) -> None:
        self.path = root / self.FILE

    def _append(self, event: BaseModel) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(event.model_dump_json() + "\n")
            f.flush()
            os.fsync(f.fileno())  # durable before the release it accounts happens

    def events(self) -> list[_Started | _Reply | _Done]:
        if not self.path.exists():
            return []
        events = []
        for line in self.path.read_text().splitlines():
            try:
                events.append(_EVENT.validate_json(line))
            except (ValidationError, json.JSONDecodeError):  # a line cut short by a crash
                continue
        return events

    def attempts(self) -> list[Attempt]:
        return [Attempt(e.attempt, e.round, e.noise) for e in self.events() if e.event == "started"]

    def start(
        self, server_round: int, noise: float | None, steps: int, sampled: list[int]
    ) -> Attempt:
        attempt = len(self.attempts()) + 1
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
        """
        events = self.events()
        started = [e for e in events if e.event == "started" and e.noise is not None]
        done = {e.attempt for e in events if e.event == "done"}
        replies = [e for e in events if e.event == "reply"]
        outside_nodes = {
            r.node: r.client for r in replies if r.client and r.client.startswith(OUTSIDE_PREFIX)
        }
        outside_rate: dict[str, float] = {}
        for r in replies:
            if r.client in outside_nodes.values() and r.rate is not None:
                outside_rate[r.client] = max(outside_rate.get(r.client, 0.0), r.rate)
        charges: dict[str, list[Charge]] = {}
        for s in started:
            if central:
                names = [*in_cluster_rates, *outside_rate]
                for name in names:
                    charges.setdefault(name, []).append(
                        Charge(s.attempt, s.round, s.noise, 1.0, s.steps)
                    )
                continue
            for name, rate in in_cluster_rates.items():
                charges.setdefault(name, []).append(
                    Charge(s.attempt, s.round, s.noise, rate, s.steps)
                )
            here = [r for r in replies if r.attempt == s.attempt]
            for name, rate in outside_rate.items():
                first = min(r.attempt for r in replies if r.client == name)
                replied = any(
                    r.status != "failed" and name in (r.client, outside_nodes.get(r.node))
                    for r in here
                )
                node_failed = any(
                    r.status == "failed" and outside_nodes.get(r.node) == name for r in here
                )
                unfinished = s.attempt not in done
                if replied or (s.attempt >= first and (unfinished or node_failed)):
                    charges.setdefault(name, []).append(
                        Charge(s.attempt, s.round, s.noise, rate, s.steps)
                    )
        return charges

    def done_rounds(self) -> set[int]:
        return {e.round for e in self.events() if e.event == "done"}
