"""serve.engine_watch: when the ingress refuses at once because no engine replica runs."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from serve import engine_watch
from serve.engine_watch import EngineDown, EngineWatch, engine_is_down


def status(**deployments) -> SimpleNamespace:
    """A stand-in for serve.status(): {name: (deployment status, running replicas)}."""
    return SimpleNamespace(
        applications={
            "app": SimpleNamespace(
                deployments={
                    name: SimpleNamespace(status=state, replica_states={"RUNNING": running})
                    for name, (state, running) in deployments.items()
                }
            )
        }
    )


@pytest.mark.parametrize(
    ("engine", "down"),
    [
        (("UNHEALTHY", 0), True),  # its only replica crashed; the replacement is loading
        (("UNHEALTHY", 1), False),  # one of two crashed: the other still answers
        (("HEALTHY", 0), False),  # scaled to zero on purpose: let requests wake it
        (("UPSCALING", 0), False),
        (("HEALTHY", 2), False),
    ],
)
def test_down_only_when_unhealthy_with_no_running_replica(engine, down):
    read = lambda: status(Ingress=("UNHEALTHY", 0), Engine=engine)  # noqa: E731
    assert engine_is_down(read, "app", "Ingress") is down  # the ingress's own state is ignored


def test_a_waiting_request_is_released_when_the_engine_goes_down(monkeypatch):
    monkeypatch.setattr(engine_watch, "POLL_S", 0.01)
    seen_down = {"now": False}
    watch = EngineWatch(lambda: seen_down["now"])

    async def go():
        assert not watch.down
        assert await watch.unless_down(asyncio.sleep(0, result="answer")) == "answer"
        waiting = asyncio.ensure_future(watch.unless_down(asyncio.sleep(60)))
        await asyncio.sleep(0.05)
        seen_down["now"] = True
        with pytest.raises(EngineDown):
            await asyncio.wait_for(waiting, 2)
        assert watch.down
        seen_down["now"] = False
        await asyncio.sleep(0.05)
        assert not watch.down

    asyncio.run(go())


def test_a_status_that_cannot_be_read_counts_as_up(monkeypatch):
    monkeypatch.setattr(engine_watch, "POLL_S", 0.01)

    def unreadable() -> bool:
        raise ConnectionError("controller gone")

    watch = EngineWatch(unreadable)

    async def go():
        assert not watch.down
        await asyncio.sleep(0.05)
        assert not watch.down
        assert await watch.unless_down(asyncio.sleep(0, result=1)) == 1

    asyncio.run(go())
