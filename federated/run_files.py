"""What a federated run leaves under the state dir: the adapter after every round and a log.

<state>/federated/<name>/round-000/   initial adapter (adapter_config.json + safetensors)
<state>/federated/<name>/round-NNN/   global adapter after round NNN (written atomically)
<state>/federated/<name>/rounds.jsonl one RoundReport per round: clients, epsilon, seconds
<state>/federated/<name>/privacy-ledger.jsonl  every accounted release (federated.privacy.ledger)

A round's line is appended (and synced) before its adapter directory is renamed into place
whole; a round counts as saved once both exist. A crash between the two leaves a line without
a directory: the round is run again (and charged again), never reported with an older adapter.
Every round with a line or an adapter must have an attempt in the privacy ledger: a run whose
ledger lost one is refused, when it resumes and when it is registered.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from flwr.app import ArrayRecord
from peft import PeftModel
from pydantic import ValidationError

from cluster.core.errors import UserError
from cluster.core.state import StateDir
from federated.adapter_state import arrays_to_adapter
from federated.privacy.ledger import ServerLedger
from federated.strategy import RoundReport
from llm.lora import save_adapter

ROUND_DIR = re.compile(r"^round-(\d{3})$")


class RunFiles:
    def __init__(self, state: StateDir, name: str) -> None:
        self.root = state.root / "federated" / name
        self.root.mkdir(parents=True, exist_ok=True)

    def adapter_dir(self, server_round: int) -> Path:
        return self.root / f"round-{server_round:03d}"

    def saved_dirs(self) -> set[int]:
        return {int(m[1]) for p in self.root.iterdir() if (m := ROUND_DIR.match(p.name))}

    def latest_round(self) -> int | None:
        """The last round saved whole, its line and its adapter, with every round before it
        (0: only the initial adapter), None if none. LedgerError if the privacy ledger lost
        the attempt of a saved round (where a resumed run starts, it is checked)."""
        self.check_charged()
        dirs, logged = self.saved_dirs(), {r.round for r in self.rounds()}
        if 0 not in dirs:
            return None
        done = 0
        while done + 1 in dirs and done + 1 in logged:
            done += 1
        return done

    def save_round(self, model: PeftModel, report: RoundReport, arrays: ArrayRecord) -> None:
        """The round's line first, then its adapter (see the module docstring)."""
        self.append_round(report)
        self.save_adapter(model, arrays, report.round)

    def check_charged(self) -> None:
        """Refuse (LedgerError) a run with a saved round, its line or its adapter, that the
        privacy ledger holds no attempt at: the release that produced it was never charged."""
        saved = self.saved_dirs() | {r.round for r in self.rounds()}
        ServerLedger(self.root).check_started(saved - {0})

    def check_complete(self, rounds: int) -> None:
        """Refuse to publish a run whose log and saved rounds disagree, or whose ledger lost a
        round's attempt (UserError)."""
        self.check_charged()
        dirs, logged = self.saved_dirs(), {r.round for r in self.rounds()}
        wanted = set(range(1, rounds + 1))
        if not wanted <= dirs or not wanted <= logged:
            raise UserError(
                f"{self.root}: rounds 1..{rounds} are not all saved and logged (adapters for "
                f"{sorted(dirs - {0})}, log lines for {sorted(logged)}); submit the run again "
                "to finish the missing rounds"
            )

    def write_error(self, text: str) -> None:
        (self.root / "run-error.txt").write_text(text)

    def read_error(self) -> str | None:
        path = self.root / "run-error.txt"
        return path.read_text() if path.exists() else None

    def clear_error(self) -> None:
        (self.root / "run-error.txt").unlink(missing_ok=True)

    def save_adapter(self, model: PeftModel, arrays: ArrayRecord, server_round: int) -> Path:
        arrays_to_adapter(model, arrays)
        return save_adapter(model, self.adapter_dir(server_round))

    def append_round(self, report: RoundReport) -> None:
        log = self.rounds_log
        last = log.read_bytes()[-1:] if log.exists() else b""
        cut = last not in (b"", b"\n")  # a line a crash cut short
        with log.open("a") as f:
            f.write(("\n" if cut else "") + report.model_dump_json() + "\n")  # not merged into it
            f.flush()
            os.fsync(f.fileno())

    @property
    def rounds_log(self) -> Path:
        return self.root / "rounds.jsonl"

    def rounds(self) -> list[RoundReport]:
        """Logged rounds, the latest line per round (a resumed run may repeat one)."""
        if not self.rounds_log.exists():
            return []
        by_round: dict[int, RoundReport] = {}
        for line in self.rounds_log.read_text().splitlines():
            try:
                report = RoundReport.model_validate_json(line)
            except ValidationError:  # a line cut short by a crash
                continue
            by_round[report.round] = report
        return [by_round[r] for r in sorted(by_round)]
