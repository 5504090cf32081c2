"""The promotion gate: a new version reaches `production` only if it beats the one there.

`decide` is the rule, a pure function of lineage records; `run_gate` applies it to a registry
(read the current production version, decide, promote).
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.errors import UserError
from cluster.registry import PRODUCTION, Registry, VersionRecord

GATE_METRIC = "eval_accuracy"  # held-out exact-match accuracy, recorded by every job


@dataclass(frozen=True)
class GateDecision:
    best: VersionRecord  # the best of the new versions
    current: VersionRecord | None  # production before the gate
    promote: bool

    @property
    def message(self) -> str:
        best = f"v{self.best.version} ({score(self.best):.1%})"
        if self.promote:
            over = f"v{self.current.version} ({score(self.current):.1%})" if self.current else None
            return f"promoted {best} over {over or 'no production version'}"
        return (
            f"kept v{self.current.version} ({score(self.current):.1%}): best new {best} "
            "does not beat it"
        )


def score(record: VersionRecord) -> float:
    value = record.lineage.metrics.get(GATE_METRIC)
    if value is None:
        raise UserError(
            f"{record.name} v{record.version} has no '{GATE_METRIC}' in its lineage: the gate "
            "cannot compare it"
        )
    return value


def decide(candidates: list[VersionRecord], current: VersionRecord | None) -> GateDecision:
    """Promote the best candidate if there is no production version or it scores strictly
    higher; on a tie the earlier candidate wins (order of `candidates`)."""
    if not candidates:
        raise ValueError("the gate needs at least one candidate version")
    best = max(candidates, key=score)  # max keeps the first of equals
    return GateDecision(best, current, current is None or score(best) > score(current))


def run_gate(registry: Registry, model_name: str, candidates: list[VersionRecord]) -> GateDecision:
    """Decide against the registry's current production version and promote if the gate says so."""
    current_ref = registry.aliases(model_name).get(PRODUCTION)
    current = registry.get(model_name, current_ref) if current_ref else None
    decision = decide(candidates, current)
    if decision.promote:
        registry.promote(model_name, decision.best.version)
    return decision
