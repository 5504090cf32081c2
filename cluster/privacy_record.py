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


class DataPrivacy(BaseModel):
    """What a version's ancestry spent of one data source: the lineage keeps one per source."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: float | None = Field(
        description="Composed over every run on this data in the version's ancestry, at `delta`; "
        "None: the data was used without differential privacy (e.g. central fine-tuning)."
    )
    delta: float | None = None
    budget_epsilon: float | None = Field(None, description="The budget the config set for it.")
    versions: list[str] = Field(
        default_factory=list, description="Ancestor versions (name:version) whose runs it composes."
    )

    @property
    def over_budget(self) -> float | None:
        """By how much epsilon exceeds the budget (inf without DP), None when within it."""
        if self.budget_epsilon is None:
            return None
        if self.epsilon is None:
            return float("inf")
        return self.epsilon - self.budget_epsilon if self.epsilon > self.budget_epsilon else None


def data_source(dataset_sha256: str, share: str) -> str:
    """A data source's name: the dataset's content hash and which share of it was used."""
    return f"{dataset_sha256[:16]}/{share}"


def sources_overlap(a: str, b: str) -> bool:
    """Same dataset and a share in common ('all' holds both the central and the clients' share)."""
    (data_a, share_a), (data_b, share_b) = a.split("/", 1), b.split("/", 1)
    return data_a == data_b and (share_a == share_b or "all" in (share_a, share_b))


class SourceRdp(BaseModel):
    """The composed RDP curve of one data source (per `RDP_ORDERS`), kept in privacy.json so a
    version federated from this one can compose further."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rdp: list[float]
    versions: list[str] = Field(default_factory=list)


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
    sources: dict[str, SourceRdp] = Field(
        default_factory=dict, description="Data source -> its RDP composed over the ancestry."
    )

    @property
    def budget(self) -> PrivacyBudget:
        return PrivacyBudget.model_validate(
            self.model_dump(exclude={"by_round", "clients", "histories", "sources"})
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
