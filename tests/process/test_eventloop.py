"""relay/process/eventloop.py: which event loop ``serve`` and ``notifier`` run on. That a
relay process really serves STARTTLS on uvloop is in tests/flows/test_lifecycle.py."""

from __future__ import annotations

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
