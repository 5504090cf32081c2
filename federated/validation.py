"""Is a client's reply safe to aggregate? Checked against the global adapter of the round.

A reply that fails is dropped by the server with the reason logged, and the round goes on: one
broken or malicious client must not poison the average or crash Flower's consistency checks.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, RecordDict

WEIGHT_KEY = "num-examples"


def _reply_records(content: RecordDict) -> tuple[ArrayRecord | None, str | None]:
    if len(content.array_records) != 1:
        return None, f"expected one ArrayRecord, got {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return None, f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(WEIGHT_KEY)
    if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        return None, f"'{WEIGHT_KEY}' must be a positive number, got {weight!r}"
    return next(iter(content.array_records.values())), None


def update_problem(global_arrays: ArrayRecord, content: RecordDict, max_norm: float) -> str | None:
    """None when the reply can be aggregated, else the reason it cannot."""
    update, problem = _reply_records(content)
    if update is None:
        return problem
    missing = sorted(set(global_arrays) - set(update))
    unexpected = sorted(set(update) - set(global_arrays))
    if missing or unexpected:
        return f"wrong keys: missing {missing[:3]}, unexpected {unexpected[:3]}"
    squared = 0.0
    for key, reference in global_arrays.items():
        new, old = update[key].numpy(), reference.numpy()
        if new.shape != old.shape:
            return f"wrong shape for {key}: {new.shape}, expected {old.shape}"
        if not np.issubdtype(new.dtype, np.floating) or not np.isfinite(new).all():
            return f"non-finite or non-float values in {key}"
        squared += float(np.square(new.astype(np.float64) - old).sum())
    norm = math.sqrt(squared)
    if norm > max_norm:
        return f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}"
    return None
