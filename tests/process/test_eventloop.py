"""relay/process/eventloop.py: which event loop ``serve`` and ``notifier`` run on. That a
relay process really serves STARTTLS on uvloop is in tests/flows/test_lifecycle.py."""

from __future__ import annotations

import asyncio
import inspect
import sys

import pytest

from relay.process import eventloop


def test_event_loop_choice_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without uvloop, auto falls back to asyncio's loop and uvloop is a clear error."""
    import uvloop

    assert eventloop.loop_factory("auto") is uvloop.new_event_loop
    assert eventloop.loop_factory("asyncio") is None
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now fails
    assert eventloop.loop_factory("auto") is None
    with pytest.raises(eventloop.EventLoopError, match="uvloop is not installed"):
        eventloop.loop_factory("uvloop")


async def _loop_name() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


@pytest.mark.parametrize(("choice", "module"), [("asyncio", "asyncio"), ("uvloop", "uvloop"),
                                                ("auto", "uvloop")])
def test_run_runs_the_coroutine_on_the_chosen_loop(choice: str, module: str) -> None:
    assert eventloop.run(_loop_name(), choice) == module


def test_run_refusing_uvloop_closes_the_coroutine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The coroutine that never ran is closed, not left to warn that it was never awaited."""
    monkeypatch.setitem(sys.modules, "uvloop", None)
    main = _loop_name()
    with pytest.raises(eventloop.EventLoopError):
        eventloop.run(main, "uvloop")
    assert inspect.getcoroutinestate(main) == inspect.CORO_CLOSED
