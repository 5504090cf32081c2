"""A privacy certificate per registered version: the guarantee in exact words, and the evidence.

`fedforge privacy certificate NAME VERSION` gathers, for one version: what it promises and to
whom (mode, adjacency, accountant), epsilon and delta per data source over its ancestry
against the model's budget, a check that the clients sampled as accounted (from the run's own
round log), the release manifest with its digest and a live check of everything the registry
holds for the version against it, the newest canary audit of its config, and what the guarantee
does not cover. Written as JSON (for machines) and Markdown (for people).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pydantic import BaseModel, Field

from cluster.core.config import load_config
from cluster.core.federated_config import FederatedConfig
from cluster.core.state import StateDir
from cluster.records.audit_log import utc_now
from cluster.records.lineage import CONFIG_FILE
from cluster.records.privacy_record import PrivacyRecord, sample_rate
from cluster.records.registry import Registry, VersionRecord
from cluster.records.release_manifest import (
    MANIFEST,
    check_registered,
    manifest_sha256,
    round_fields,
    unlisted,
)

GUARANTEE = {
    "local_dp": (
        "For every client c that trained in the run that made this version (an in-cluster "
        "partition or an outside SuperNode), everything the run released that depends on c's "
        "data is (epsilon_c, delta)-differentially private with respect to c's dataset under "
        "add/remove-one-example adjacency, epsilon_c composed by the accountant over every "
        "DP-SGD step of every round attempt c trained in. The run's epsilon is the largest "
        "epsilon_c. Across versions, an example's privacy loss composes every run in this "
        "version's ancestry that used it (per data source below, the worst example's)."
    ),
    "central_dp": (
        "Client-level: adding or removing one client's whole update changes the distribution "
        "of every released aggregate by at most a factor e^epsilon plus delta; updates are "
        "clipped, summed over a fixed denominator and noised by the server, so the guarantee "
        "holds against whoever sees the aggregates, not against the server. Across versions, "
        "as for local DP, per example over the ancestry."
    ),
    "none": "No differential privacy: nothing is guaranteed about the training data.",
}
NOT_COVERED = [
    "Data used without DP by design (the central share a fine-tune trains on in clear) and any "
    "version outside this version's ancestry: independent versions trained on the same examples "
    "spend privacy too, and are not composed here.",
    "People rather than examples: a person with k examples is protected at group level only "
    "(roughly k times epsilon).",
    "Each client's example count, and the accounting made from it (sampling rates, epsilon "
    "per client): treated as public (they set a client's sampling rate and weight).",
    "What the server observes of the transport: when each reply arrives, and from which node.",
    "Noise from a non-cryptographic generator (Opacus secure_mode off) and floating-point "
    "side channels of the Gaussian mechanism.",
    "Alias moves made outside fedforge (MLflow's UI or API) bypass the budget check.",
    "Outside clients that misreport their data size weaken only their own accounting; their "
    "aggregation weight is capped by the server.",
]


class SourceSpend(BaseModel):
    source: str
    private: bool
    epsilon: float | None
    delta: float | None
    versions: list[str]
    budget_epsilon: float | None
    within_budget: bool | None = Field(description="None: no budget binds this source.")


class SamplerCheck(BaseModel):
    method: str
    checked: bool = Field(description="Whether the run's round log was here to check against.")
    ok: bool | None
    findings: list[str]


class AuditSummary(BaseModel):
    run: str
    date: str
    mode: str
    reported_epsilon: float | None
    lower_bound: float
    ceiling: float | None
    canaries: int
    guesses: int
    confidence: float
    file: str


class Certificate(BaseModel):
    model: str
    version: str
    issued_at: str
    adapter_sha256: str
    mode: str
    guarantee: str
    accountant: str | None
    delta: float | None
    run_epsilon: float | None
    budget_epsilon: float | None
    sources: list[SourceSpend]
    sampler: SamplerCheck
    manifest_sha256: str
    manifest: list[dict[str, str]]
    release_problems: list[str]
    audit: AuditSummary | None
    not_covered: list[str]


def _sources(record: VersionRecord, budget: float | None) -> list[SourceSpend]:
    spent = []
    for source, p in sorted(record.lineage.data_privacy.items()):
        binds = budget is not None and p.private
        spent.append(
            SourceSpend(
                source=source,
                private=p.private,
                epsilon=p.epsilon,
                delta=p.delta,
                versions=p.versions,
                budget_epsilon=budget if binds else None,
                within_budget=(p.over(budget) is None) if binds else None,
            )
        )
    return spent


def check_sampler(
    privacy: PrivacyRecord | None, rounds_log: Path | None, batch_size: int | None
) -> SamplerCheck:
    """Confirm from the run's own round log that every kept in-cluster client was charged at the
    Poisson rate of its example count (1 / ceil(n / batch)) for the steps it reported, and that
    the epsilon its own Opacus accountant reported is within what the ledger charged it."""
    method = "Opacus DPDataLoader: Poisson sampling (each example drawn independently)"
    if privacy is None or privacy.mode != "local_dp":
        mode = privacy.mode if privacy else "none"
        return SamplerCheck(method=f"not sampled per example ({mode})", checked=False, ok=None,
                            findings=[])  # fmt: skip
    if rounds_log is None or not rounds_log.is_file() or batch_size is None:
        return SamplerCheck(
            method=method, checked=False, ok=None,
            findings=["the run's round log is not in this state dir: rates not re-checked"],
        )  # fmt: skip
    findings = []
    for line in rounds_log.read_text().splitlines():
        report = json.loads(line)
        ledger = next((r for r in privacy.by_round if r.round == report["round"]), None)
        for metrics in (report.get("per_client") or {}).values():
            if metrics["partition"] < 0:  # an outside client: charged at the rate it claimed
                continue
            client = str(metrics["partition"])
            charged = {c.rate for c in privacy.histories.get(client, []) if not c.assumed}
            expected = sample_rate(metrics["num_examples"], batch_size)
            if charged != {expected}:
                findings.append(
                    f"round {report['round']}, client {client}: {metrics['num_examples']} "
                    f"examples sample at {expected:.4g}, charged at {sorted(charged)}"
                )
            own, ledger_eps = metrics.get("epsilon"), ledger and ledger.clients.get(client)
            if own is not None and ledger_eps is not None and own > ledger_eps + 1e-6:
                findings.append(
                    f"round {report['round']}, client {client}: reported epsilon {own:.4g} "
                    f"above the ledger's {ledger_eps:.4g}"
                )
    return SamplerCheck(method=method, checked=True, ok=not findings, findings=findings)


def _round_log_problems(rounds_log: Path | None, private: bool) -> list[str]:
    """What the run's round log holds that the manifest does not cover for it."""
    if rounds_log is None or not rounds_log.is_file():
        return []
    fields = {
        f for line in rounds_log.read_text().splitlines() for f in round_fields(json.loads(line))
    }
    return [f"{p} (rounds.jsonl)" for p in unlisted("round_field", sorted(fields), private)]


def newest_audit(state: StateDir, run_name: str) -> AuditSummary | None:
    """The newest canary audit of the config this version's run was made with."""
    found = []
    for path in state.reports.glob(f"audit-{run_name}-audit-*.json"):
        data = json.loads(path.read_text())
        found.append((data.get("date", ""), path, data))
    if not found:
        return None
    _, path, data = max(found, key=lambda item: item[0])
    return AuditSummary(
        run=data["run"], date=data.get("date", ""), mode=data["mode"],
        reported_epsilon=data.get("reported_epsilon"), lower_bound=data["lower_bound"],
        ceiling=data.get("ceiling"), canaries=data["canaries"], guesses=data["guesses"],
        confidence=data["confidence"], file=str(path),
    )  # fmt: skip


def issue(registry: Registry, state: StateDir, name: str, ref: str) -> Certificate:
    record = registry.get(name, ref)
    with tempfile.TemporaryDirectory() as tmp:
        privacy = PrivacyRecord.read(registry.download(name, record.version, Path(tmp)))
        config = registry.read_optional(record, CONFIG_FILE)
        batch_size = None
        if config is not None and privacy is not None:
            config_path = Path(tmp) / "config.yaml"
            config_path.write_text(config)
            batch_size = load_config(config_path, FederatedConfig).federation.batch_size
    run = record.lineage.run_name
    rounds_log = state.root / "federated" / run / "rounds.jsonl" if run else None
    mode = privacy.mode if privacy else "none"
    budget = registry.privacy_budget(name)
    return Certificate(
        model=name,
        version=record.version,
        issued_at=utc_now(),
        adapter_sha256=record.adapter_sha256,
        mode=mode,
        guarantee=GUARANTEE[mode],
        accountant=privacy.accountant if privacy else None,
        delta=privacy.delta if privacy else None,
        run_epsilon=privacy.epsilon if privacy else None,
        budget_epsilon=budget,
        sources=_sources(record, budget),
        sampler=check_sampler(privacy, rounds_log, batch_size),
        manifest_sha256=manifest_sha256(),
        manifest=[
            {"place": e.place, "item": e.pattern, "coverage": e.coverage, "why": e.why}
            for e in MANIFEST
        ],
        release_problems=[
            *check_registered(registry, record),
            *_round_log_problems(rounds_log, private=mode != "none"),
        ],
        audit=newest_audit(state, run) if run else None,
        not_covered=NOT_COVERED,
    )


def _eps(value: float | None) -> str:
    return "infinite (no guarantee)" if value is None else f"{value:.4g}"


def render_markdown(cert: Certificate) -> str:
    lines = [
        f"# Privacy certificate: `{cert.model}` v{cert.version}",
        "",
        f"Issued {cert.issued_at} (UTC) by `fedforge privacy certificate {cert.model} "
        f"{cert.version}`; adapter sha256 `{cert.adapter_sha256 or 'not recorded'}`.",
        "",
        "## The guarantee",
        "",
        f"Mode `{cert.mode}`"
        + (f", accountant `{cert.accountant}`, delta {cert.delta:g}" if cert.delta else "")
        + (f", the run's epsilon {cert.run_epsilon:.4g}." if cert.run_epsilon else "."),
        "",
        cert.guarantee,
        "",
        "## Spent per data source, over the ancestry",
        "",
        f"The model's budget: {f'epsilon {cert.budget_epsilon:g}' if cert.budget_epsilon else 'none set'}.",  # noqa: E501
        "",
        "| data source | claimed private | epsilon | delta | budget | ancestors |",
        "|---|---|---|---|---|---|",
    ]
    for s in cert.sources:
        verdict = "-" if s.within_budget is None else ("within" if s.within_budget else "OVER")
        budget = f"{s.budget_epsilon:g} ({verdict})" if s.budget_epsilon else "-"
        eps = _eps(s.epsilon) if s.private else "no DP by design"
        lines.append(
            f"| {s.source} | {'yes' if s.private else 'no'} | {eps} | "
            f"{s.delta if s.delta else '-'} | {budget} | {', '.join(s.versions) or '-'} |"
        )
    sampler = cert.sampler
    status = "not checked" if not sampler.checked else ("confirmed" if sampler.ok else "FAILED")
    lines += ["", "## Sampling", "", f"{sampler.method}: {status}."]
    lines += [f"- {f}" for f in sampler.findings]
    lines += [
        "",
        "## Release manifest",
        "",
        f"sha256 `{cert.manifest_sha256}` (cluster/records/release_manifest.py). Everything the "
        "registry holds for this version, and the run's round log where this state dir has it, "
        "checked against it now: "
        + ("nothing unlisted." if not cert.release_problems else "PROBLEMS:"),
        *[f"- {p}" for p in cert.release_problems],
        "",
        "| where | item | coverage | why |",
        "|---|---|---|---|",
        *[
            f"| {m['place']} | `{m['item']}` | {m['coverage']} | {m['why']} |"
            for m in cert.manifest
        ],
        "",
        "## Empirical audit",
        "",
    ]
    if cert.audit is None:
        lines.append("No canary audit of this version's config in this state dir "
                     "(`fedforge privacy audit --config ...`).")  # fmt: skip
    else:
        a = cert.audit
        ceiling = f"{a.ceiling:.3f}" if a.ceiling is not None else "not recorded"
        lines.append(
            f"Newest canary audit of this config ({a.date}, mode {a.mode}, {a.canaries} "
            f"canaries, {a.guesses} guesses, confidence {a.confidence:g}): epsilon lower bound "
            f"{a.lower_bound:.3f} (ceiling {ceiling}) against a reported {_eps(a.reported_epsilon)}"
            f". It audits the implementation on a run with canaries, not this version's weights."
        )
    lines += ["", "## Not covered", "", *[f"- {n}" for n in cert.not_covered], ""]
    return "\n".join(lines)


def write(cert: Certificate, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"privacy-certificate-{cert.model}-v{cert.version}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(cert.model_dump_json(indent=2) + "\n")
    md_path.write_text(render_markdown(cert))
    return json_path, md_path
