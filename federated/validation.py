"""Is a client's reply safe to aggregate? Checked against the global adapter of the round.

A reply that fails is dropped by the server with the reason logged, and the round goes on: one
broken or malicious client must not poison the average or crash Flower's consistency checks.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from federated.protocol import MessageError, TrainReply


def _update_problem(global_arrays: ArrayRecord, update: ArrayRecord, max_norm: float) -> str | None:
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


def accepted_reply(global_arrays: ArrayRecord, content: RecordDict, max_norm: float) -> TrainReply:
    """The reply when it can be aggregated; else MessageError with the reason it cannot."""
    reply = TrainReply.from_content(content)  # the protocol's records and metrics
    problem = _update_problem(global_arrays, reply.arrays, max_norm)
    if problem:
        raise MessageError(problem)
    return reply
