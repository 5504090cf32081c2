"""What a federated run leaves under the state dir: the adapter after every round and a log.

<state>/federated/<name>/round-000/   initial adapter (adapter_config.json + safetensors)
<state>/federated/<name>/round-NNN/   global adapter after round NNN (written atomically)
<state>/federated/<name>/rounds.jsonl one RoundReport per round: clients, loss, epsilon, seconds

A round counts as saved once its adapter directory exists: it is renamed into place whole, and
its log line is appended after it, so a crash between the two loses the line, not the round.
"""

from __future__ import annotations

import re
from pathlib import Path

from flwr.app import ArrayRecord
from peft import PeftModel
from pydantic import ValidationError

from cluster.state import StateDir
from federated.adapter_state import arrays_to_adapter
from federated.strategy import RoundReport
from llm.lora import save_adapter

ROUND_DIR = re.compile(r"^round-(\d{3})$")


class RunFiles:
    def __init__(self, state: StateDir, name: str) -> None:
        self.root = state.root / "federated" / name
        self.root.mkdir(parents=True, exist_ok=True)

    def adapter_dir(self, server_round: int) -> Path:
        return self.root / f"round-{server_round:03d}"

    def latest_round(self) -> int | None:
        """The last round whose adapter was saved (0: only the initial one), None if none."""
        rounds = [int(m[1]) for p in self.root.iterdir() if (m := ROUND_DIR.match(p.name))]
        return max(rounds, default=None)

    def save_adapter(self, model: PeftModel, arrays: ArrayRecord, server_round: int) -> Path:
        arrays_to_adapter(model, arrays)
        return save_adapter(model, self.adapter_dir(server_round))

    def append_round(self, report: RoundReport) -> None:
        with self.rounds_log.open("a") as f:
            f.write(report.model_dump_json() + "\n")

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
