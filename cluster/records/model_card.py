"""A version's model card: Markdown generated from its lineage and its registered job config.

The registry writes it at registration, beside the adapter (`MODEL_CARD_FILE`), so the card is
the record of what the version was when it was made: the base model, the data (sha256, size,
description), how it scored on held-out examples beside the base model, the privacy it spent
(this run, and composed over its ancestry per data source), what it is for and not for (the
config's `card` section), and the full config. What happens later (the gate's decision, its
aliases, who promoted it) is rendered by `lifecycle` when the card is shown.
"""

from __future__ import annotations

import yaml
from pydantic import ValidationError

from cluster.core.config import CardSettings, DataSettings
from cluster.records.lineage import CONFIG_FILE, Lineage

NOT_RECORDED = "not recorded"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[str, object]], header: tuple[str, ...] = ("", "")) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fence(text: str, lang: str = "") -> str:
    fence = "~~~~" if "```" in text else "```"
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _parse_config(text: str | None) -> tuple[CardSettings, DataSettings | None, str]:
    """The card and data sections of the registered config, and a note when they cannot be read
    (a version registered without a config, or with one this fedforge no longer reads)."""
    if text is None:
        return CardSettings(), None, "No job config was registered with this version."
    try:
        raw = yaml.safe_load(text)
        raw = raw if isinstance(raw, dict) else {}
        card = CardSettings.model_validate(raw.get("card") or {})
        data = DataSettings.model_validate(raw["data"]) if "data" in raw else None
    except (yaml.YAMLError, ValidationError, TypeError) as exc:
        return CardSettings(), None, f"The registered config could not be read: {exc}"
    return card, data, ""


def _stated(text: str | None, key: str) -> str:
    return text.strip() if text else f"_Not stated: set `card.{key}` in the job config._"


def _metric(name: str, value: float) -> str:
    return f"{value:.1%}" if name.endswith("accuracy") else f"{value:.4g}"


def _evaluation(lineage: Lineage) -> str:
    metrics = lineage.metrics
    rows = []
    for key, value in sorted(metrics.items()):
        if not key.startswith("eval_"):
            continue
        name = key.removeprefix("eval_")
        base = metrics.get(f"base_{name}")
        rows.append((name, _metric(name, value), _metric(name, base) if base is not None else "-"))
    other = [
        (k, _metric(k, v))
        for k, v in sorted(metrics.items())
        if not k.startswith(("eval_", "base_"))
    ]
    if not rows and not other:
        return "No held-out metrics were recorded."
    scored = lineage.validation_examples
    lead = f"On {scored} held-out examples" if scored else "On the held-out split"
    text = f"{lead} (the same split for every job on this data; accuracy is exact match):\n\n"
    text += _table(rows, ("metric", "this version", "base model")) if rows else ""
    if other:
        text += "\n\nOther recorded metrics:\n\n" + _table(other, ("metric", "value"))
    return text


def _privacy(lineage: Lineage, name: str, version: str) -> str:
    parts = [
        "The guarantee in exact words, the sampling check, the release manifest and the newest "
        f"audit: `fedforge privacy certificate {name} {version}` (privacy-certificate-{name}-"
        f"v{version}.md)."
    ]
    p = lineage.privacy
    if p is None:
        parts.append("This run trained without differential privacy (no privacy record).")
    else:
        eps = f"{p.epsilon:.4g}" if p.epsilon is not None else "-"
        parts.append(
            "This run (epsilon: the largest over every client, composed over every accounted "
            "release):\n\n"
            + _table(
                [
                    ("mode", p.mode),
                    ("epsilon", eps),
                    ("delta", f"{p.delta:g}" if p.delta is not None else "-"),
                    ("noise multiplier", p.noise_multiplier if p.noise_multiplier else "-"),
                    ("max grad norm", p.max_grad_norm if p.max_grad_norm else "-"),
                    ("sample rate (worst client)", p.sample_rate if p.sample_rate else "-"),
                    ("steps (most of any client)", p.steps if p.steps is not None else "-"),
                    ("accountant", p.accountant or "-"),
                ]
            )
        )
    if lineage.data_privacy:
        rows = []
        for source, spent in sorted(lineage.data_privacy.items()):
            if not spent.private:
                used = "no DP by design: no guarantee claimed"
            else:
                used = "no DP: no guarantee" if spent.epsilon is None else f"{spent.epsilon:.4g}"
            rows.append(
                (
                    source,
                    used,
                    "-" if spent.delta is None else f"{spent.delta:g}",
                    ", ".join(spent.versions) or "-",
                )
            )
        parts.append(
            "Cumulative, per data source (keyed dataset digest prefix / share), composed per "
            "example over every run in this version's ancestry that used it (the model's budget "
            "and the full guarantee: `fedforge privacy certificate`):\n\n"
            + _table(rows, ("data source", "epsilon", "delta", "ancestor versions"))
        )
    return "\n\n".join(parts)


def render_card(
    *,
    name: str,
    version: str,
    run_id: str,
    lineage: Lineage,
    config_text: str | None,
    registered_at: str | None,
    adapter_sha256: str = "",
) -> str:
    """The card of version `version` of `name`, from what registration knows."""
    card, data, config_note = _parse_config(config_text)
    kind = f"{lineage.kind} (run `{lineage.run_name}`)" if lineage.run_name else lineage.kind
    model_rows = [
        ("kind", kind),
        ("base model", f"`{lineage.base_model}`"),
        ("adapter", f"LoRA, rank {lineage.lora_rank}" if lineage.lora_rank else "LoRA"),
        ("adapter sha256", adapter_sha256 or NOT_RECORDED),
        ("MLflow run", f"`{run_id}`"),
        ("git revision", lineage.git_revision or NOT_RECORDED),
        ("config sha256", lineage.config_sha256 or NOT_RECORDED),
    ]
    data_rows: list[tuple[str, object]] = []
    if data is not None:
        data_rows.append(("path", f"`{data.path}`"))
    data_rows.append(("digest (keyed)", lineage.dataset_digest or NOT_RECORDED))
    if data is not None:
        share = data.share
        if data.central_fraction:
            share += f" (central share: {data.central_fraction:.0%} of the training split)"
        data_rows += [
            ("share used", share),
            ("held out", f"{data.validation_fraction:.0%} (split seed {data.split_seed})"),
        ]
    environment = [("python", lineage.python or NOT_RECORDED)]
    environment += [("platform", lineage.platform)] if lineage.platform else []
    environment += sorted(lineage.packages.items())
    config = _fence(config_text, "yaml") if config_text is not None else f"_{config_note}_"
    if config_text is not None and config_note:
        config = f"_{config_note}_\n\n{config}"
    when = f"Registered {registered_at} (UTC)" if registered_at else "Registration time unknown"
    return f"""# Model card: `{name}` v{version}

{when}. Generated by fedforge from the version's lineage and its job
config at registration; `fedforge registry show {name} {version} --card` adds what happened since
(the gate's decision, aliases, promotions).

## Model

{_table(model_rows)}

## Intended use

{_stated(card.intended_use, "intended_use")}

## Limitations

{_stated(card.limitations, "limitations")}

## Training data

{_table(data_rows)}

{_stated(card.data_description, "data_description")}

## Evaluation

{_evaluation(lineage)}

## Privacy

{_privacy(lineage, name, version)}

## Environment

{_table(environment)}

## Job config (`{CONFIG_FILE}`)

{config}
"""


def lifecycle(
    *, as_of: str, aliases: list[str], gate: str | None, card_check: str, events: list[str]
) -> str:
    """What happened to the version since registration, as the registry knows it at `as_of`."""
    history = "\n".join(f"- `{line}`" for line in events) or "- no entries"
    return f"""
## Since registration (as of {as_of} UTC)

- aliases now: {", ".join(aliases) or "none"}
- promotion gate: {gate or "not judged by the gate"}
- this card: {card_check}

Audit log entries for this version (`fedforge registry history`):

{history}
"""
