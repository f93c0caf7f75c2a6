"""A real HTTP receiver standing in for the CRM's webhook endpoint (the notifier's in-app
channel posts to it): aiohttp on 127.0.0.1, port 0, recording every request."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping

from aiohttp import web

# The signing secret the tests give the notifier's webhook channel.
WEBHOOK_SECRET = "webhook-signing-secret-0123456789"


@dataclasses.dataclass
class Received:
    path: str
    headers: Mapping[str, str]
    body: bytes
    status: int | None = None  # None: never answered (the client went away first)

    @property
    def event_id(self) -> str:
        return self.headers["Idempotency-Key"]


class Receiver:
    """aiohttp on 127.0.0.1, port 0. Answers the statuses in ``statuses`` in turn, then 200;
    the first ``hold`` requests wait for ``gate`` (a hanging CRM)."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.statuses: list[int] = []
        self.hold = 0
        self.gate = asyncio.Event()
        self.aborted = 0
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        # handler_cancellation: a request the client abandons is seen as aborted.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=1)
        self.port = 0

    async def _handle(self, request: web.Request) -> web.Response:
        entry = Received(request.path, dict(request.headers), await request.read())
        self.requests.append(entry)
        if self.hold > 0:
            self.hold -= 1
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.aborted += 1
                raise
        entry.status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=entry.status)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        self.gate.set()
        await self._runner.cleanup()

    def url(self, path: str = "/notify") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def delivered(self, path: str | None = None) -> list[Received]:
        return [r for r in self.requests if r.status is not None and 200 <= r.status < 300
                and (path is None or r.path == path)]
