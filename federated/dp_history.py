"""A client's privacy-accountant history as Flower keeps it between rounds (no torch import).

The ClientApp stores it in `context.state`, so it must stay cheap to import: in-cluster
ClientApps hand the training itself to a warm Ray actor and never import torch.
"""

from __future__ import annotations

from flwr.app import ConfigRecord

History = list[tuple[float, float, int]]  # Opacus' (noise_multiplier, sample_rate, steps)


def history_to_record(history: History) -> ConfigRecord:
    return ConfigRecord(
        {
            "noise": [float(h[0]) for h in history],
            "rate": [float(h[1]) for h in history],
            "steps": [int(h[2]) for h in history],
        }
    )


def history_from_record(record: ConfigRecord | None) -> History:
    if record is None:
        return []
    return list(zip(record["noise"], record["rate"], record["steps"], strict=True))
