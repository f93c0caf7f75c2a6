"""The worker's side of the supervisor link: a socket pair that says "serving" and
whose EOF tells the worker its supervisor is gone; and the ``worker`` tag on its log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger()

READY = b"R"


# -- the worker's side ---------------------------------------------------------------------
def tag_logs(index: int) -> None:
    """Every log line of this process carries ``worker``. Call before anything logs:
    structlog's cached loggers keep the processors they were first used with."""
    config = structlog.get_config()

    def add_worker(logger: object, method: str,
                   event: structlog.typing.EventDict) -> structlog.typing.EventDict:
        event.setdefault("worker", index)
        return event

    structlog.configure(processors=[add_worker, *config["processors"]])


class WorkerLink:
    """A worker's inherited sockets and its line to the supervisor."""

    def __init__(self, index: int, link: socket.socket,
                 sockets: Mapping[str, socket.socket]) -> None:
        self.index = index
        self.sockets = dict(sockets)
        self._link = link

    @staticmethod
    def spec(index: int, link_fd: int, socket_fds: Mapping[str, int]) -> str:
        return json.dumps({"index": index, "link": link_fd, "sockets": dict(socket_fds)})

    @classmethod
    def from_spec(cls, text: str) -> WorkerLink:
        """Raises ValueError for a spec the supervisor did not write."""
        try:
            spec = json.loads(text)
            index, link_fd, fds = int(spec["index"]), int(spec["link"]), dict(spec["sockets"])
            link = socket.socket(fileno=link_fd)
            sockets = {str(name): socket.socket(fileno=int(fd)) for name, fd in fds.items()}
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise ValueError(f"bad --worker specification: {exc}") from None
        link.setblocking(False)
        return cls(index, link, sockets)

    def started(self, on_parent_gone: Callable[[], None]) -> None:
        """Tell the supervisor this worker serves; call ``on_parent_gone`` if it vanishes."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            self._link.send(READY)

        def readable() -> None:
            try:
                data = self._link.recv(64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(self._link.fileno())
                log.warning("worker.orphaned", note="the supervisor is gone; draining")
                on_parent_gone()

        loop.add_reader(self._link.fileno(), readable)

