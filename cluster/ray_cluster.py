"""Connecting to Ray: an existing cluster when an address is given, else a local head."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    metrics_export_port: int | None = None,
) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS); without one, start a local head.

    Inside `ray job submit` Ray sets RAY_ADDRESS, so the job joins the cluster it was sent to.
    `metrics_export_port` is where a local head serves Prometheus metrics (on a cluster it is
    `ray start --metrics-export-port`).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # "local" always starts a fresh head, never silently joins a `ray start` cluster on the host.
    context = ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        log_to_driver=True,
        _metrics_export_port=metrics_export_port,
    )
    dashboard = getattr(context, "dashboard_url", None)
    print(
        f"[fedforge] started a local Ray head; dashboard: http://{dashboard}"
        if dashboard
        else "[fedforge] started a local Ray head",
        flush=True,
    )
