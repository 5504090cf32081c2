"""Joining Ray: an existing cluster when an address is given, else a local head. The one place
fedforge processes call `ray.init`."""

from __future__ import annotations

import os
import signal
import threading

import ray


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    metrics_export_port: int | None = None,
    namespace: str | None = None,
    quiet: bool = False,
) -> str | None:
    """Join the cluster at `address` (or $RAY_ADDRESS); without one, start a local head.

    Inside `ray job submit` Ray sets RAY_ADDRESS, so the job joins the cluster it was sent to.
    `metrics_export_port` is where a local head serves Prometheus metrics (on a cluster it is
    `ray start --metrics-export-port`). `quiet` keeps worker logs out of this process (a
    short-lived helper such as a Flower ClientApp). Returns the dashboard address of a head
    started here, else None.
    """
    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _keeping_sigterm_handler(
            lambda: ray.init(address=address, namespace=namespace, log_to_driver=not quiet)
        )
        return None
    # "local" always starts a fresh head, never silently joins a `ray start` cluster on the host.
    context = _keeping_sigterm_handler(
        lambda: ray.init(
            address="local",
            num_cpus=num_cpus,
            namespace=namespace,
            include_dashboard=True,
            log_to_driver=not quiet,
            _metrics_export_port=metrics_export_port,
        )
    )
    dashboard = getattr(context, "dashboard_url", None)
    print(
        f"[fedforge] started a local Ray head; dashboard: http://{dashboard}"
        if dashboard
        else "[fedforge] started a local Ray head",
        flush=True,
    )
    return dashboard


def _keeping_sigterm_handler(init):
    """Run `init` (a ray.init) and put this process' own SIGTERM handler back afterwards.

    ray.init installs one that calls sys.exit and lets Ray's own handler abort the process about
    3 s into the clean-up, leaving the head's agents behind. The job's handler
    (cluster.core.entry.run_job) unwinds like Ctrl-C instead, and `ray.shutdown` at exit stops them.
    """
    handler = signal.getsignal(signal.SIGTERM)
    if not callable(handler) or threading.current_thread() is not threading.main_thread():
        return init()  # no handler of ours to keep (or not ours to set: main thread only)
    try:
        return init()
    finally:
        signal.signal(signal.SIGTERM, handler)
