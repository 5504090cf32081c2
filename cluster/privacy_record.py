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
        description="Largest over every client that ever trained in the run, composed over "
        "every accounted release (re-run rounds and rejected replies included): each client's "
        "guarantee is at least as good.",
    )
    delta: float | None = None
    noise_multiplier: float | None = Field(
        None, description="The smallest used (a resumed run may have changed it)."
    )
    max_grad_norm: float | None = None
    sample_rate: float | None = Field(None, description="Worst (largest) per-client rate.")
    steps: int | None = Field(None, description="Most accounted steps of any one client.")
    accountant: str | None = None


class ClientCharge(BaseModel):
    """One accounted release for one client: Opacus' (noise_multiplier, sample_rate, steps)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attempt: int = Field(description="The run's round attempt (a re-run round is a new one).")
    round: int
    noise: float
    rate: float
    steps: int
    assumed: bool = Field(False, description="Charged as the worst case, not seen trained.")


class RoundPrivacy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int
    epsilon: float | None = None
    clients: dict[str, float | None] = Field(
        default_factory=dict,
        description="Client (partition id, or outside-<node id>) -> epsilon after this round.",
    )

    @property
    def worst(self) -> float | None:
        return max(
            (e for e in (self.epsilon, *self.clients.values()) if e is not None), default=None
        )


class PrivacyRecord(PrivacyBudget):
    by_round: list[RoundPrivacy] = Field(default_factory=list)
    clients: dict[str, float] = Field(
        default_factory=dict, description="Client -> its final epsilon (the ledger's)."
    )
    histories: dict[str, list[ClientCharge]] = Field(
        default_factory=dict,
        description="Client -> every release charged to it: recompute any epsilon with "
        "Opacus' accountant from these alone.",
    )

    @property
    def budget(self) -> PrivacyBudget:
        return PrivacyBudget.model_validate(
            self.model_dump(exclude={"by_round", "clients", "histories"})
        )

    def write(self, adapter_dir: Path) -> Path:
        path = adapter_dir / PRIVACY_FILE
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def read(cls, adapter_dir: Path) -> PrivacyRecord | None:
        """The record in an adapter directory; None for an adapter not trained federated."""
        path = adapter_dir / PRIVACY_FILE
        return cls.model_validate_json(path.read_text()) if path.is_file() else None
