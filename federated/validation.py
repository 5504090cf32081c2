"""Is a client's reply safe to aggregate? Checked against the global adapter of the round.

A reply that fails is dropped by the server with the reason logged, and the round goes on: one
broken or malicious client must not poison the average or crash the server. Arrays are checked
by their declared type, dtype, shape and byte size before they are deserialised. Reasons name
what the server checked, never text the client chose (its keys, its dtype strings, the words
of an exception its payload raised).
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from federated.protocol import MessageError, TrainReply

NPY_HEADER_MAX = 4096  # an .npy header is 128 bytes or a few multiples; more is not an array


def _declared_problem(key: str, new: Array, old: Array) -> str | None:
    if not isinstance(new, Array) or new.stype != old.stype:
        return f"{key} is not a numpy array"
    if new.dtype != old.dtype:
        return f"wrong dtype for {key}: expected {old.dtype}"
    if tuple(new.shape) != tuple(old.shape):
        return f"wrong shape for {key}: {tuple(new.shape)}, expected {tuple(old.shape)}"
    payload = math.prod(old.shape) * np.dtype(old.dtype).itemsize
    if not payload <= len(new.data) <= payload + NPY_HEADER_MAX:
        return f"{key} holds {len(new.data)} bytes, not a {old.dtype} array of {tuple(old.shape)}"
    return None


def update_of(
    global_arrays: ArrayRecord, update: ArrayRecord, max_norm: float
) -> dict[str, np.ndarray]:
    """The client's update (its adapter minus the global one) as float64, or MessageError."""
    missing = sorted(set(global_arrays) - set(update))
    unexpected = sorted(set(update) - set(global_arrays))
    if missing or unexpected:
        raise MessageError(f"wrong keys: missing {missing[:3]}, {len(unexpected)} unexpected")
    for key, reference in global_arrays.items():
        if problem := _declared_problem(key, update[key], reference):
            raise MessageError(problem)
    delta, squared = {}, 0.0
    for key, reference in global_arrays.items():
        try:
            new = update[key].numpy()
        except Exception as exc:  # noqa: BLE001 - any undecodable payload is the client's fault
            raise MessageError(f"{key} cannot be read as an array ({type(exc).__name__})") from None
        if new.shape != tuple(reference.shape) or new.dtype != np.dtype(reference.dtype):
            raise MessageError(f"{key}'s payload does not match its declared dtype and shape")
        if not np.issubdtype(new.dtype, np.floating) or not np.isfinite(new).all():
            raise MessageError(f"non-finite or non-float values in {key}")
        delta[key] = new.astype(np.float64) - reference.numpy().astype(np.float64)
        squared += float(np.square(delta[key]).sum())
    norm = math.sqrt(squared)
    if norm > max_norm:
        raise MessageError(f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}")
    return delta


def accepted_reply(
    global_arrays: ArrayRecord, content: RecordDict, max_norm: float, private: bool = False
) -> tuple[TrainReply, dict[str, np.ndarray]]:
    """The reply and its update when it can be aggregated; else MessageError with the reason."""
    reply = TrainReply.from_content(content, private)  # the protocol's records and metrics
    return reply, update_of(global_arrays, reply.arrays, max_norm)
