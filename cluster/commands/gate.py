"""The promotion gate: a new version reaches `production` only if it beats the one there.

`decide` is the rule, a pure function of lineage records; `run_gate` applies it to a registry
(read the current production version, decide, record the decision on the versions it judged,
promote with the decision as the audit log's reason).
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.core.errors import UserError
from cluster.records.privacy_record import budget_overrun
from cluster.records.registry import PRODUCTION, Registry, VersionRecord

GATE_METRIC = "eval_accuracy"  # held-out exact-match accuracy, recorded by every job


@dataclass(frozen=True)
class GateDecision:
    best: VersionRecord | None  # the best new version within its privacy budgets (None: none)
    current: VersionRecord | None  # production before the gate
    promote: bool
    refused: tuple[str, ...] = ()  # new versions past a privacy budget, and by how much

    @property
    def message(self) -> str:
        if self.best is None:
            verdict = f"kept {_label(self.current)}" if self.current else "promoted nothing"
        elif self.promote:
            over = _label(self.current) if self.current else "no production version"
            verdict = f"promoted {_label(self.best)} over {over}"
        else:
            verdict = f"kept {_label(self.current)}: best new {_label(self.best)} does not beat it"
        return "; ".join([verdict, *(f"refused {why}" for why in self.refused)])


def _label(record: VersionRecord) -> str:
    return f"v{record.version} ({score(record):.1%})"


def score(record: VersionRecord) -> float:
    value = record.lineage.metrics.get(GATE_METRIC)
    if value is None:
        raise UserError(
            f"{record.name} v{record.version} has no '{GATE_METRIC}' in its lineage: the gate "
            "cannot compare it"
        )
    return value


def decide(
    candidates: list[VersionRecord], current: VersionRecord | None, budget: float | None = None
) -> GateDecision:
    """Promote the best candidate within the model's privacy `budget` if there is no production
    version or it scores strictly higher; on a tie the earlier candidate wins (order of
    `candidates`)."""
    if not candidates:
        raise ValueError("the gate needs at least one candidate version")
    overruns = {
        c.version: budget_overrun(c.lineage.data_privacy, budget, f"v{c.version}")
        for c in candidates
    }
    refused = tuple(why for why in overruns.values() if why)
    eligible = [c for c in candidates if not overruns[c.version]]
    if not eligible:
        return GateDecision(None, current, False, refused)
    best = max(eligible, key=score)  # max keeps the first of equals
    return GateDecision(best, current, current is None or score(best) > score(current), refused)


def run_gate(registry: Registry, model_name: str, candidates: list[VersionRecord]) -> GateDecision:
    """Decide against the registry's current production version and promote if the gate says so."""
    current_ref = registry.aliases(model_name).get(PRODUCTION)
    current = registry.get(model_name, current_ref) if current_ref else None
    decision = decide(candidates, current, registry.privacy_budget(model_name))
    registry.record_gate(model_name, [c.version for c in candidates], decision.message)
    if decision.promote:
        registry.promote(model_name, decision.best.version, reason=f"gate: {decision.message}")
    return decision
