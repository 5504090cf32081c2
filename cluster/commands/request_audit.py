"""What stood behind one logged answer: the version, its adapter digest, data and epsilon, and
who had put it in production by then. Used by `fedforge audit request` and the demo report."""

from __future__ import annotations

from pathlib import Path

from cluster.records.audit_log import holder_at
from cluster.records.registry import PRODUCTION, Registry, RegistryError
from cluster.records.request_log import AnsweredRequest, read_entries


def find_answers(directory: Path, request_id: str) -> list[AnsweredRequest]:
    """Every logged answer under `request_id` (Serve's X-Request-ID, or the answer's `id`)."""
    return [
        e for e in read_entries(directory).entries if request_id in (e.request_id, e.response_id)
    ]


def describe(registry: Registry, entry: AnsweredRequest) -> str:
    lines = _answer_lines(entry)
    if entry.adapter:
        lines += _version_lines(registry, entry)
    else:
        lines.append("  base model  no adapter: the base model answered")
    return "\n".join(lines)


def _answer_lines(entry: AnsweredRequest) -> list[str]:
    tokens = f"{entry.prompt_tokens} prompt + {entry.completion_tokens} completion tokens"
    return [
        f"request {entry.request_id}  (answer id {entry.response_id or '-'})",
        f"  time        {entry.time}  latency {entry.latency_ms:.0f} ms  "
        + ("streamed" if entry.stream else "whole")
        + ("" if entry.complete else ", CUT SHORT"),
        f"  caller      key id {entry.key_id or '(endpoint without keys)'}  {entry.route}",
        f"  asked for   {entry.model}",
        f"  answered by {entry.answered_by}  adapter sha256 {entry.adapter_sha256 or '-'}",
        f"  tokens      {tokens}",
    ]


def _version_lines(registry: Registry, entry: AnsweredRequest) -> list[str]:
    try:
        record = registry.get(entry.adapter, entry.version)
    except RegistryError as exc:
        return [f"  registry    {exc} (deleted since?)"]
    lineage = record.lineage
    digest = record.adapter_sha256
    if not digest or not entry.adapter_sha256:
        check = "not recorded on both sides"
    else:
        check = "matches the registered files" if digest == entry.adapter_sha256 else "DIFFERS"
    lines = [
        f"  version     {record.name} v{record.version} ({lineage.kind}, run "
        f"{lineage.run_name or record.run_id}), adapter digest {check}",
        f"  base model  {lineage.base_model}",
        f"  data        digest (keyed) {lineage.dataset_digest or '-'}",
    ]
    if lineage.privacy is not None and lineage.privacy.epsilon is not None:
        p = lineage.privacy
        lines.append(f"  this run    epsilon {p.epsilon:.4g} at delta {p.delta:g} ({p.mode})")
    for source, spent in sorted(lineage.data_privacy.items()):
        spent_text = (
            "used without differential privacy (no guarantee)"
            if spent.epsilon is None
            else f"epsilon {spent.epsilon:.4g} composed per example over its ancestry"
        )
        lines.append(f"  privacy     data {source}: {spent_text}")
    if entry.model == record.name:  # asked by alias: who had put this version there?
        moved = holder_at(registry.history(record.name), PRODUCTION, entry.timestamp)
        if moved is None:
            lines.append("  production  no logged move of production before this answer")
        else:
            same = "" if moved.new == record.version else f" (NOT v{record.version}: see verify)"
            lines.append(f"  production  {moved.line()}{same}")
    lines.append(f"  card        fedforge registry show {record.name} {record.version} --card")
    return lines
