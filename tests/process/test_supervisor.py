"""The sockets the worker supervisor binds behave like the ones a single process binds:
an accepted connection has Nagle's algorithm off on asyncio's loop as on uvloop (SMTP is
request/reply; a reply held back for a delayed ACK would add up to 40 ms)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from relay.config.endpoints import Endpoint
from relay.process.supervisor import _bind


async def _server_side_nodelay(sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[int] = loop.create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            peer = transport.get_extra_info("socket")
            accepted.set_result(peer.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    server = await loop.create_server(Probe, sock=sock)
    try:
        port = sock.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(accepted, 10)
        finally:
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_bound_socket_says_tcp() -> None:
    sock = _bind(Endpoint("127.0.0.1", 0))
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_accepted_connections_have_nagle_off(loop_kind: str) -> None:
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    else:
        runner = asyncio.Runner()
    with runner:
        assert runner.run(_server_side_nodelay(_bind(Endpoint("127.0.0.1", 0)))) == 1
