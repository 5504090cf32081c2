"""The privacy record of a federated adapter: what `privacy.json` holds and the lineage shows.

Written by the federated job into the adapter directory it registers (so the guarantee travels
with the adapter), read back by `fedforge privacy report` and the demo. One schema for both.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PRIVACY_FILE = "privacy.json"


def sample_rate(n_examples: int, batch_size: int) -> float:
    """Poisson sampling rate Opacus' DPDataLoader derives from a DataLoader (1 / len(loader))."""
    return 1 / math.ceil(n_examples / batch_size)


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
    """What a version's ancestry spent of one data source: the lineage keeps one per source.

    Composed per example (federated.privacy.ancestry): the epsilon of a source is the worst over its
    examples of everything released about each one in the ancestry, whichever run, file or
    share it came through."""

    # Records before the budget moved to the registered model carried `budget_epsilon`.
    model_config = ConfigDict(extra="ignore", frozen=True)

    epsilon: float | None = Field(
        description="At `delta`; None: no guarantee (some run in the ancestry used at least one "
        "of these examples without differential privacy)."
    )
    delta: float | None = None
    private: bool = Field(
        True,
        description="A run claimed DP for these examples, so a privacy budget binds them. False "
        "only for data used without DP by design and never under DP in the ancestry (the central "
        "share of a fine-tune).",
    )
    versions: list[str] = Field(
        default_factory=list, description="Ancestor versions (name:version) whose runs it composes."
    )

    def over(self, budget: float) -> float | None:
        """By how much epsilon exceeds `budget` (inf: no guarantee left), None within it or for
        data that never claimed DP."""
        if not self.private:
            return None
        if self.epsilon is None:
            return float("inf")
        return self.epsilon - budget if self.epsilon > budget else None


def budget_overrun(
    data_privacy: dict[str, DataPrivacy], budget: float | None, label: str
) -> str | None:
    """Why a version (`label`, e.g. 'v4') is past `budget` on some data source, or None."""
    if budget is None:
        return None
    for source, spent in sorted(data_privacy.items()):
        over = spent.over(budget)
        if over is None:
            continue
        if spent.epsilon is None:
            return (
                f"{label}: its ancestry used data {source} without differential privacy "
                f"(epsilon infinite), budget {budget:g}"
            )
        return (
            f"{label}: its ancestry spent epsilon {spent.epsilon:.3f} of data {source}, budget "
            f"{budget:g} ({over:.3f} over)"
        )
    return None


def data_source(dataset_digest: str, share: str) -> str:
    """A data source's display name: the dataset's keyed digest and the share that was used.
    Names only label: composition goes by the examples (`DataUse.examples`)."""
    return f"{dataset_digest[:16]}/{share}"


class DataUse(BaseModel):
    """One run's use of a set of examples, what the ancestry composes per example. A version
    registers the uses of its whole ancestry (`data_uses.json`): its own run's and every
    ancestor's, so a descendant composes further without reading the ancestors again."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(
        "", description="name:version whose run it was; '' in that version's own file."
    )
    source: str = Field(description="Display name (data_source).")
    rdp: list[float] | None = Field(
        description="The run's RDP at each order of federated.privacy.ancestry.RDP_ORDERS, its "
        "worst client's (so it holds for any example of the run); None: trained without DP."
    )
    key_id: str | None = Field(
        None,
        description="The example key that made `examples` (cluster.core.example_ids). None: which "
        "examples the run used is not known (a version registered before these records), so it "
        "is taken to have used every example.",
    )
    examples: list[str] = Field(default_factory=list, description="Keyed example ids.")
    outside_examples: bool = Field(
        False, description="Outside clients also trained, on examples the server never sees."
    )

    @property
    def private(self) -> bool:
        return self.rdp is not None


class DataUses(BaseModel):
    """The `data_uses.json` a version registers beside its adapter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uses: list[DataUse]

    def of_version(self, ref: str) -> list[DataUse]:
        """The uses as a descendant sees them: the version's own run named by `ref`."""
        return [u if u.version else u.model_copy(update={"version": ref}) for u in self.uses]


class SourceRdp(BaseModel):
    """A data source's RDP curve as versions registered before `data_uses.json` kept it in
    privacy.json (read for their descendants, never written)."""

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
        default_factory=dict,
        description="Data source -> its RDP over the ancestry, in records made before "
        "data_uses.json (read only).",
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
