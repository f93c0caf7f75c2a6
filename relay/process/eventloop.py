"""The event loop ``serve`` and ``notifier`` run on: uvloop when it is installed (the ``run``
extra), asyncio's own otherwise; ``RELAY_EVENT_LOOP=asyncio|uvloop|auto`` chooses.

uvloop runs the relay's STARTTLS unchanged: aiosmtpd switches the connection to TLS with
``transport.set_protocol`` and asyncio's ``SSLProtocol``, which uvloop's transports support
(proven end to end in ``tests/flows/test_lifecycle.py``: STARTTLS, AUTH and a message through a
relay process on uvloop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class EventLoopError(RuntimeError):
    """The configured event loop cannot be used (uvloop asked for, not installed)."""


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A factory for ``asyncio.Runner``: None means asyncio's default loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise EventLoopError("event_loop: uvloop is not installed "
                                 "(pip install uvloop, or set RELAY_EVENT_LOOP=asyncio)") \
                from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    """``asyncio.run(main)`` on the chosen loop. Raises EventLoopError."""
    try:
        factory = loop_factory(choice)
    except EventLoopError:
        main.close()  # never awaited: say so quietly instead of a RuntimeWarning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
