"""The demo's summary table and its report directory (Markdown + PNG plots, the new versions'
model cards and the model's alias history).

Numbers come from where the jobs put them: accuracy and epsilon from the registered versions'
lineage tags, loss and epsilon curves from their MLflow runs, latencies from the demo requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from cluster.commands.gate import GateDecision  # noqa: E402
from cluster.commands.request_audit import describe, find_answers  # noqa: E402
from cluster.core.state import StateDir  # noqa: E402
from cluster.records import privacy_certificate  # noqa: E402
from cluster.records.lineage import COMMUNICATION_METRIC  # noqa: E402
from cluster.records.registry import Registry, VersionRecord  # noqa: E402


@dataclass
class DemoResult:
    versions: dict[str, VersionRecord] = field(default_factory=dict)  # stage -> new version
    gate: GateDecision | None = None
    endpoint: str = ""
    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    cold_start: float = 0.0  # serving job submitted -> first answer from the adapter
    answers: list[tuple[str, str]] = field(default_factory=list)
    minutes: float = 0.0
    request_log: Path | None = None  # the endpoint's, when it kept one
    audited_request: str = ""  # X-Request-ID of the demo's last answer


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(seconds: list[float], q: float) -> str:
    return f"{percentile(seconds, q) * 1000:.0f} ms" if seconds else "-"


def _accuracy(record: VersionRecord) -> str:
    return f"{record.lineage.metrics.get('eval_accuracy', float('nan')):.1%}"


def _privacy(record: VersionRecord) -> str:
    privacy = record.lineage.privacy
    if privacy is None or privacy.epsilon is None:
        return "no DP"
    return f"({privacy.epsilon:.2f}, {privacy.delta:g})"


def _communication(record: VersionRecord) -> str:
    moved = record.lineage.metrics.get(COMMUNICATION_METRIC)
    return f"{moved:.1f} MB" if moved is not None else "-"


def summary_rows(result: DemoResult, model_name: str) -> list[tuple[str, str]]:
    fine, fed = result.versions["fine-tuned"], result.versions["federated"]
    base = fine.lineage.metrics.get("base_accuracy", float("nan"))
    return [
        ("held-out accuracy: base model", f"{base:.1%}"),
        (f"... fine-tuned, central share ({model_name}:{fine.version})", _accuracy(fine)),
        (f"... federated from it, DP ({model_name}:{fed.version})", _accuracy(fed)),
        ("privacy of the federated rounds (epsilon, delta)", _privacy(fed)),
        ("communication of the federated rounds (adapter tensors)", _communication(fed)),
        ("gate", result.gate.message if result.gate else "-"),
        ("endpoint", f"{result.endpoint} (model '{model_name}')"),
        (f"first token p50 / p99 ({len(result.latencies)} streamed requests)",
         f"{_ms(result.first_token, 0.5)} / {_ms(result.first_token, 0.99)}"),
        ("cold start: serving job submitted -> first answer", f"{result.cold_start:.0f} s"),
        ("8-token answer p50 / p99",
         f"{_ms(result.latencies, 0.5)} / {_ms(result.latencies, 0.99)}"),
        ("wall time", f"{result.minutes:.1f} min"),
    ]  # fmt: skip


def summary_table(result: DemoResult, model_name: str) -> str:
    rows = summary_rows(result, model_name)
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}}   {v}" for k, v in rows), line])


def _history(registry: Registry, run_id: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted(registry.client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in points], [m.value for m in points]


def _plot_training(registry: Registry, run_id: str, path: Path) -> None:
    steps, loss = _history(registry, run_id, "loss")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, marker=".")
    ax.set(xlabel="step", ylabel="training loss", title="Fine-tuning (Ray Train)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_federated(registry: Registry, run_id: str, path: Path) -> None:
    """Privacy spent by round (and the clients' training loss where it was reported: under DP
    clients keep it to themselves, since DP does not cover it)."""
    eps_rounds, eps = _history(registry, run_id, "epsilon")
    loss_rounds, loss = _history(registry, run_id, "train_loss")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.set(xlabel="round", title="Federated rounds")
    if eps:
        ax.plot(eps_rounds, eps, marker="s", color="tab:red")
        ax.set_ylabel("epsilon (worst client)", color="tab:red")
        ax.set_xticks(eps_rounds)
    if loss:
        right = ax.twinx() if eps else ax
        right.plot(loss_rounds, loss, marker="o", color="tab:blue")
        right.set_ylabel("clients' training loss", color="tab:blue")
        ax.set_xticks(loss_rounds)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_latency(result: DemoResult, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([t * 1000 for t in result.first_token], bins=12, alpha=0.7, label="first token")
    ax.hist([t * 1000 for t in result.latencies], bins=12, alpha=0.7, label="whole answer")
    ax.set(xlabel="ms", ylabel="requests", title="Demo request latency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _governance(
    registry: Registry, state: StateDir, result: DemoResult, out: Path, model_name: str
) -> str:
    """Write each new version's model card, the federated version's privacy certificate and the
    model's alias history (with the log's verification) next to the report; return the report's
    section linking them."""
    cards = []
    for stage, record in result.versions.items():
        path = out / f"model-card-{model_name}-v{record.version}.md"
        path.write_text(registry.card(record))
        cards.append(f"- {stage}: [{model_name} v{record.version}]({path.name})")
    federated = result.versions["federated"]
    cert = privacy_certificate.issue(registry, state, model_name, federated.version)
    _, cert_path = privacy_certificate.write(cert, out)
    sampling = "confirmed" if cert.sampler.ok else "not confirmed"
    manifest = "nothing unlisted" if not cert.release_problems else "UNLISTED RELEASES"
    check = registry.verify(model_name)
    verdict = (
        f"intact: {check.entries} entries, head sha256 `{check.head_sha256}`"
        if check.ok
        else f"FAILED: {check.problems[0]}"
    )
    lines = [entry.line() for entry in registry.history(model_name)]
    history = out / "alias-history.md"
    history.write_text(
        f"# Alias history and audit log of `{model_name}`\n\n"
        f"`fedforge registry verify {model_name}`: {verdict}\n\n"
        + "\n".join(f"- `{line}`" for line in lines)
        + "\n"
    )
    return "\n".join(
        [
            "## Governance",
            "",
            "Model cards (`fedforge registry show NAME VERSION --card`):",
            "",
            *cards,
            "",
            f"Privacy certificate of the federated version (`fedforge privacy certificate "
            f"{model_name} {federated.version}`): [{cert_path.name}]({cert_path.name}); "
            f"sampling {sampling}, release manifest: {manifest}.",
            "",
            f"Alias history and audit log (`fedforge registry history {model_name}`): "
            f"[{history.name}]({history.name}), log {verdict.split(':')[0]}.",
            *_answer_audit(registry, result, out),
        ]
    )


def _answer_audit(registry: Registry, result: DemoResult, out: Path) -> list[str]:
    """What `fedforge audit request` says of the demo's last answer, written beside the report."""
    request_id = result.audited_request
    if not (request_id and result.request_log):
        return []
    found = find_answers(result.request_log, request_id)
    said = "\n\n".join(describe(registry, e) for e in found) or "not in the request log"
    path = out / "answer-audit.md"
    path.write_text(
        f"# Which version answered request `{request_id}`\n\n"
        f"`fedforge audit request {request_id}`:\n\n```\n{said}\n```\n"
    )
    return ["", f"Which version answered the demo's last request: [{path.name}]({path.name})."]


def write_report(
    result: DemoResult, registry: Registry, state: StateDir, out: Path, model_name: str
) -> Path:
    """Markdown report with three PNGs, the new versions' model cards and the model's alias
    history in `out`; returns the report's path."""
    _plot_training(registry, result.versions["fine-tuned"].run_id, out / "training_loss.png")
    _plot_federated(registry, result.versions["federated"].run_id, out / "federated.png")
    _plot_latency(result, out / "latency.png")
    table = "\n".join(f"| {k} | {v} |" for k, v in summary_rows(result, model_name))
    answers = "\n".join(f"| {q} | `{a}` |" for q, a in result.answers)
    governance = _governance(registry, state, result, out, model_name)
    report = out / "report.md"
    report.write_text(
        f"""# fedforge demo report

| | |
|---|---|
{table}

Registry: `fedforge registry list {model_name} --state-dir {state.root}`

## Answers from the served adapter (`{model_name}`)

| prompt | answer |
|---|---|
{answers}

## Plots

![training loss](training_loss.png)

![federated loss and epsilon](federated.png)

![latency](latency.png)

{governance}

Stage logs: the `*.log` files next to this report.
"""
    )
    return report
