"""What a federated run leaves under the state dir: the adapter after every round and a log.

<state>/federated/<name>/round-000/   initial adapter (adapter_config.json + safetensors)
<state>/federated/<name>/round-NNN/   global adapter after round NNN
<state>/federated/<name>/rounds.jsonl one line per round: clients, loss, epsilon, seconds
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from flwr.app import ArrayRecord
from peft import PeftModel

from cluster.state import StateDir
from federated.adapter_state import arrays_to_adapter
from federated.strategy import RoundReport
from llm.lora import save_adapter


class RunFiles:
    def __init__(self, state: StateDir, name: str) -> None:
        self.root = state.root / "federated" / name
        self.root.mkdir(parents=True, exist_ok=True)

    def adapter_dir(self, server_round: int) -> Path:
        return self.root / f"round-{server_round:03d}"

    def save_adapter(self, model: PeftModel, arrays: ArrayRecord, server_round: int) -> Path:
        arrays_to_adapter(model, arrays)
        return save_adapter(model, self.adapter_dir(server_round))

    def append_round(self, report: RoundReport) -> None:
        line = {k: v for k, v in asdict(report).items() if k != "arrays"}
        line["rejected"] = {str(k): v for k, v in report.rejected.items()}
        with (self.root / "rounds.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")

    def rounds(self) -> list[dict]:
        path = self.root / "rounds.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
