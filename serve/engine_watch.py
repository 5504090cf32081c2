"""Whether any engine replica can answer, read from Ray Serve's controller in the background.

When the only engine replica crashes, Ray Serve's router holds every request, queued or new,
until a replacement has loaded the model: tens of seconds on CPU, minutes on a busy machine,
with no word to the caller. While the controller reports an engine deployment UNHEALTHY with no
running replica, the ingress answers 503 with Retry-After instead: new requests at once, and
requests still waiting for an engine when it went down as soon as that is seen. A deployment
scaled to zero on purpose reads HEALTHY, so scale-from-zero still gets its first request through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("fedforge.serve")
POLL_S = 1.0


class EngineDown(Exception):
    """No engine replica runs and the controller reports the engine unhealthy."""


def engine_is_down(read_status: Callable[[], object], app: str, ingress: str) -> bool:
    """True when some deployment of `app` other than the ingress is UNHEALTHY with no replica
    RUNNING (`read_status` is `serve.status`)."""
    deployments = read_status().applications[app].deployments
    for name, deployment in deployments.items():
        state = str(getattr(deployment.status, "value", deployment.status))
        running = deployment.replica_states.get("RUNNING")
        if name != ingress and state == "UNHEALTHY" and not running:
            return True
    return False


class EngineWatch:
    """Polls `is_down()` (a blocking call, run off the event loop) every POLL_S seconds, from
    the first request on. A status that cannot be read counts as up: never refuse on a guess."""

    def __init__(self, is_down: Callable[[], bool]):
        self._is_down = is_down
        self._down = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def down(self) -> bool:
        self._start()
        return self._down.is_set()

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        warned = False
        while True:
            try:
                down = await asyncio.to_thread(self._is_down)
            except Exception as exc:  # noqa: BLE001 - unknown reads as up
                if not warned:
                    log.warning("cannot read the engine's status from Serve: %r", exc)
                    warned = True
                down = False
            if down and not self._down.is_set():
                log.warning("no engine replica runs: answering 503 until one does")
            if down:
                self._down.set()
            else:
                self._down.clear()
            await asyncio.sleep(POLL_S)

    async def unless_down(self, call: Awaitable):
        """Await `call`, or raise EngineDown (cancelling it) if the engine is seen down first."""
        self._start()
        work = asyncio.ensure_future(call)
        went_down = asyncio.ensure_future(self._down.wait())
        try:
            done, _ = await asyncio.wait({work, went_down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            went_down.cancel()
        if work in done:
            return work.result()
        work.cancel()
        raise EngineDown
