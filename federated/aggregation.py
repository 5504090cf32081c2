"""Averaging validated client updates into the next global adapter: weights set by the server.

- `weighted_average` (FedAvg): each update weighted by what the server knows of the client's
  data, never by what the client claims.
- `central_dp_average` (central DP): each update clipped to `clip`, summed, divided by a fixed
  denominator (the clients sampled for the round, data-independent: a client that fails or is
  rejected counts as a zero update), plus Gaussian noise of std `sigma * clip / denominator`.
  Adding or removing one client moves the sum by at most `clip`, the average by at most
  `clip / denominator`: the noise multiplier the accountant charges is exactly `sigma`.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

Update = dict[str, np.ndarray]  # key -> client adapter minus global adapter (float64)


def _apply(global_arrays: ArrayRecord, step: Update) -> ArrayRecord:
    out = {}
    for key, reference in global_arrays.items():
        old = reference.numpy()
        out[key] = Array((old.astype(np.float64) + step[key]).astype(old.dtype))
    return ArrayRecord(out)


def weighted_average(
    global_arrays: ArrayRecord, updates: list[tuple[Update, float]]
) -> ArrayRecord:
    """The global adapter moved by the weighted mean of the updates (unchanged without any)."""
    total = sum(w for _, w in updates)
    if not updates or total <= 0:
        return global_arrays
    step = {k: sum(u[k] * (w / total) for u, w in updates) for k in global_arrays}
    return _apply(global_arrays, step)


def clip(update: Update, bound: float) -> Update:
    norm = float(np.sqrt(sum(np.square(v).sum() for v in update.values())))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in update.items()}


def central_dp_average(
    global_arrays: ArrayRecord,
    updates: list[Update],
    *,
    clip_norm: float,
    sigma: float,
    denominator: int,
    rng: np.random.Generator,
) -> ArrayRecord:
    """The global adapter moved by (sum of clipped updates + N(0, (sigma*clip)^2)) / denominator."""
    if denominator < max(1, len(updates)):
        raise ValueError(f"denominator {denominator} is below the {len(updates)} updates summed")
    clipped = [clip(u, clip_norm) for u in updates]
    step = {}
    for key, reference in global_arrays.items():
        total = sum((u[key] for u in clipped), np.zeros(reference.shape, np.float64))
        noise = rng.normal(0.0, sigma * clip_norm, size=reference.shape)
        step[key] = (total + noise) / denominator
    return _apply(global_arrays, step)
