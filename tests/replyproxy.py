"""A real TCP proxy between a client and redis-server that can lose one reply the way a
Redis SIGKILL does: the command reaches Redis and runs, its reply never comes back, and
Redis is then unreachable until the test says it is back.

``drop_reply_to(marker)`` arms it: the next command whose bytes contain ``marker`` is
forwarded; once Redis's reply to it arrives at the proxy (so the command certainly ran),
that reply is discarded and the proxy goes down: every connection through it is cut, and
a new one is accepted and closed at once (redis-py's retry-once meets the outage too).
``heal`` brings it back. ``refuse(marker)`` keeps every command containing ``marker`` from
Redis (the connection that sends one is cut) until ``allow``: that one kind of command
meets an outage while the others go through. What is dropped or refused is chosen by the
command's content (a script's SHA1, a key), never by timing.
"""

from __future__ import annotations

import asyncio
import contextlib

# Markers are at most this long + 1 (a script's SHA1 is 40): the bytes of the previous read
# kept to find one that straddles two reads.
TAIL = 63


class ReplyDroppingProxy:
    """127.0.0.1:<port> forwarding to 127.0.0.1:``redis_port``."""

    def __init__(self, redis_port: int) -> None:
        self._redis_port = redis_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._marker: bytes | None = None
        self._refused: set[bytes] = set()
        self.down = False
        self.port = 0
        # Set once an armed command's reply was dropped.
        self.dropped = asyncio.Event()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> ReplyDroppingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        self._cut_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def drop_reply_to(self, marker: bytes) -> None:
        self._marker = marker
        self.dropped.clear()

    def heal(self) -> None:
        self.down = False

    def refuse(self, marker: bytes) -> None:
        self._refused.add(marker)

    def allow(self, marker: bytes) -> None:
        self._refused.discard(marker)

    def _cut_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1",
                                                                       self._redis_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, redis_writer}
        # Set by the client->Redis pump before it forwards the armed command, so the
        # first reply bytes read after it are that command's (redis-py waits for a reply
        # before it sends the next command on a connection).
        armed = asyncio.Event()
        pumps = [asyncio.ensure_future(self._commands(reader, redis_writer, armed)),
                 asyncio.ensure_future(self._replies(redis_reader, writer, armed))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for end in (writer, redis_writer):
                self._writers.discard(end)
                end.transport.abort()

    async def _commands(self, reader: asyncio.StreamReader, redis_writer: asyncio.StreamWriter,
                        armed: asyncio.Event) -> None:
        tail = b""
        while chunk := await reader.read(65536):
            # The marker may straddle two reads: look in the end of the last one too.
            seen = tail + chunk
            if any(marker in seen for marker in self._refused):
                return  # not forwarded; _serve cuts both ends
            if self._marker is not None and self._marker in seen:
                self._marker = None
                armed.set()
            tail = seen[-TAIL:]
            redis_writer.write(chunk)
            with contextlib.suppress(ConnectionError):
                await redis_writer.drain()

    async def _replies(self, redis_reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       armed: asyncio.Event) -> None:
        while chunk := await redis_reader.read(65536):
            if armed.is_set():
                # The command ran; its reply is lost, and Redis is gone for everyone.
                self.down = True
                self._cut_all()
                self.dropped.set()
                return
            writer.write(chunk)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
