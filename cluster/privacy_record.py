"""The privacy record of a federated adapter: what `privacy.json` holds and the lineage shows.

Written by the federated job into the adapter directory it registers (so the guarantee travels
with the adapter), read back by `fedforge privacy report` and the demo. One schema for both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PRIVACY_FILE = "privacy.json"


class PrivacyBudget(BaseModel):
    """The guarantee of a whole run: the part of the record kept in the registry's lineage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["none", "local_dp", "central_dp"]
    epsilon: float | None = Field(
        None,
        description="Worst (largest) over clients and rounds: each client's is at least as good.",
    )
    delta: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    sample_rate: float | None = Field(None, description="Worst (largest) per-client rate.")
    steps: int | None = Field(None, description="Accounted steps per client over all rounds.")
    accountant: str | None = None


class RoundPrivacy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int
    epsilon: float | None = None
    clients: dict[str, float | None] = Field(
        default_factory=dict, description="Client (partition id) -> epsilon after this round."
    )

    @property
    def worst(self) -> float | None:
        return max(
            (e for e in (self.epsilon, *self.clients.values()) if e is not None), default=None
        )


class PrivacyRecord(PrivacyBudget):
    by_round: list[RoundPrivacy] = Field(default_factory=list)

    @property
    def budget(self) -> PrivacyBudget:
        return PrivacyBudget.model_validate(self.model_dump(exclude={"by_round"}))

    def write(self, adapter_dir: Path) -> Path:
        path = adapter_dir / PRIVACY_FILE
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def read(cls, adapter_dir: Path) -> PrivacyRecord | None:
        """The record in an adapter directory; None for an adapter not trained federated."""
        path = adapter_dir / PRIVACY_FILE
        return cls.model_validate_json(path.read_text()) if path.is_file() else None
