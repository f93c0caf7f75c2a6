"""relay/delivery/pool.py: a bounded pool of persistent connections to one upstream, and the
session that sends one message on one of them, against real SMTP servers on loopback (the
suite's capturing upstream, and a scripted one that records every command and can drop the
connection after the message)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from relay.config.endpoints import UpstreamTarget
from relay.delivery.pool import SmtpUpstream
from relay.errors import (
    RelayError,
    UpstreamBusyError,
    UpstreamOutcomeUnknownError,
    UpstreamUnavailableError,
)
from relay.message.wire import Outgoing, stuff
from tests.conftest import CapturingUpstream, free_port, message


def pool_for(port: int, **options: float) -> SmtpUpstream:
    return SmtpUpstream(UpstreamTarget("127.0.0.1", port, "none"), local_hostname="relay.test",
                        **{"size": 2, "timeout": 5, **options})  # type: ignore[arg-type]


@pytest.fixture
async def pool(upstream: CapturingUpstream) -> AsyncIterator[SmtpUpstream]:
    pooled = pool_for(upstream.port)
    yield pooled
    await pooled.close()


def outgoing(subject: str = "Pooled") -> Outgoing:
    return Outgoing((stuff(message(subject=subject)),))


async def send(pool: SmtpUpstream, *recipients: str, subject: str = "Pooled") -> str:
    session = await pool.begin("agent@kw.test", [], smtputf8=False)
    try:
        for address in recipients:
            await session.rcpt(address, [])
        return await session.data(outgoing(subject))
    finally:
        await session.release(reusable=True)


class ScriptedUpstream:
    """A minimal SMTP server that records each command line; ``after_message`` decides what
    follows the message's final dot (by default the 250)."""

    def __init__(self, after_message: Callable[[asyncio.StreamWriter], bool] | None = None):
        self.commands: list[str] = []
        self.after_message = after_message
        self.server: asyncio.Server | None = None
        self.port = 0
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        writer.write(b"220 scripted.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                command = line.decode().strip()
                self.commands.append(command)
                verb = command.split(" ", 1)[0].upper()
                if verb == "EHLO":
                    writer.write(b"250-scripted.test\r\n250 8BITMIME\r\n")
                elif verb == "DATA":
                    writer.write(b"354 go ahead\r\n")
                    await reader.readuntil(b"\r\n.\r\n")
                    if self.after_message is not None and not self.after_message(writer):
                        writer.close()
                        return
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"250 OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening, close every connection and wait for their handlers to end (a
        transport left for the garbage collector is a ResourceWarning)."""
        if self.server is not None:
            self.server.close()
        for writer in self._connections.values():
            writer.close()
        await asyncio.gather(*self._connections, return_exceptions=True)
        for writer in self._connections.values():
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@asynccontextmanager
async def scripted(after_message: Callable[[asyncio.StreamWriter], bool] | None = None
                   ) -> AsyncIterator[ScriptedUpstream]:
    server = ScriptedUpstream(after_message)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# -- one connection, reused ------------------------------------------------------------------
async def test_messages_go_through_one_pooled_connection(
        pool: SmtpUpstream, upstream: CapturingUpstream) -> None:
    """Two messages in turn share one connection; each gets the upstream's reply text."""
    assert "queued as UP123" in await send(pool, "a@example.test", subject="one")
    assert "queued as UP123" in await send(pool, "b@example.test", subject="two")
    assert upstream.handler.connections == 1
    assert [m.rcpt_tos for m in upstream.messages] == [["a@example.test"], ["b@example.test"]]
    assert (pool.busy, pool.idle) == (0, 1)


async def test_a_session_released_before_its_message_is_reset_before_reuse(
        pool: SmtpUpstream, upstream: CapturingUpstream) -> None:
    """A transaction given up after RCPT (the client's RSET): the connection is reset and
    reused, and the next message carries none of the abandoned recipients."""
    session = await pool.begin("agent@kw.test", [], smtputf8=False)
    await session.rcpt("abandoned@example.test", [])
    await session.release(reusable=True)
    await session.release(reusable=True)  # a second release does nothing
    assert (pool.busy, pool.idle) == (0, 1)
    await send(pool, "b@example.test")
    assert upstream.handler.connections == 1
    assert [m.rcpt_tos for m in upstream.messages] == [["b@example.test"]]


async def test_a_session_released_as_not_reusable_closes_its_connection(
        pool: SmtpUpstream, upstream: CapturingUpstream) -> None:
    session = await pool.begin("agent@kw.test", [], smtputf8=False)
    await session.release(reusable=False)
    assert (pool.busy, pool.idle) == (0, 0)
    await send(pool, "b@example.test")
    assert upstream.handler.connections == 2


async def test_an_idle_connection_past_its_time_is_not_reused(
        upstream: CapturingUpstream) -> None:
    pool = pool_for(upstream.port, idle_seconds=0)
    try:
        await send(pool, "a@example.test")
        await send(pool, "b@example.test")
    finally:
        await pool.close()
    assert upstream.handler.connections == 2


async def test_a_full_pool_answers_busy_without_asking_the_upstream(
        upstream: CapturingUpstream) -> None:
    """Every connection carrying a transaction: the next begin waits its timeout for a slot,
    then is refused 451 4.4.5 (congestion, not an unreachable upstream)."""
    pool = pool_for(upstream.port, size=1)
    held = await pool.begin("agent@kw.test", [], smtputf8=False)
    # The wait for a slot is the pool's timeout: short now that the only slot is taken (the
    # connection above had the usual time to open).
    pool.timeout = 0.05
    try:
        with pytest.raises(UpstreamBusyError) as busy:
            await pool.begin("agent@kw.test", [], smtputf8=False)
        assert (busy.value.code, busy.value.status) == (451, "4.4.5")
        assert upstream.handler.connections == 1
        assert pool.busy == 1
    finally:
        await held.release(reusable=True)
        await pool.close()
    assert pool.busy == 0


# -- what the upstream answers ---------------------------------------------------------------
async def test_mail_parameters_are_forwarded_only_when_the_upstream_offers_them(
        pool: SmtpUpstream, upstream: CapturingUpstream) -> None:
    session = await pool.begin("agent@kw.test", ["SIZE=1000", "BODY=8BITMIME", "RET=HDRS"],
                               smtputf8=False)
    await session.rcpt("a@example.test", [])
    await session.data(outgoing())
    await session.release(reusable=True)
    [sent] = upstream.messages
    assert sent.mail_options == ["SIZE=1000", "BODY=8BITMIME"]


@pytest.mark.parametrize(("step", "reply"), [
    ("mail", "451 4.3.0 Try again later"),
    ("rcpt", "550 5.1.1 No such user"),
    ("rcpt", "452 4.2.2 Mailbox full"),
    ("data", "554 5.7.1 Rejected as spam"),
])
async def test_an_upstream_refusal_keeps_its_class_and_code(
        pool: SmtpUpstream, upstream: CapturingUpstream, step: str, reply: str) -> None:
    """MAIL, RCPT or DATA refused: the relay's refusal has the upstream's code and enhanced
    status, temporary for a 4xx and permanent for a 5xx."""
    behaviour = upstream.behaviour
    if step == "mail":
        behaviour.mail_reply = reply
    elif step == "rcpt":
        behaviour.rcpt_replies["a@example.test"] = reply
    else:
        behaviour.data_reply = reply
    with pytest.raises(RelayError) as refused:
        await send(pool, "a@example.test")
    code, status = int(reply[:3]), reply.split()[1]
    assert (refused.value.code, refused.value.status) == (code, status)
    assert refused.value.permanent is (code >= 500)
    assert upstream.messages == []


async def test_an_unreachable_upstream_is_temporary_and_seen_as_down() -> None:
    pool = pool_for(free_port())
    try:
        with pytest.raises(UpstreamUnavailableError) as down:
            await pool.begin("agent@kw.test", [], smtputf8=False)
        assert down.value.code == 451
        assert pool.reachable() is False
        assert pool.busy == 0
    finally:
        await pool.close()


async def test_reachable_after_a_connection_succeeded(pool: SmtpUpstream) -> None:
    await send(pool, "a@example.test")
    assert pool.reachable() is True


async def test_a_connection_lost_after_the_message_is_an_unknown_outcome() -> None:
    """The upstream took the whole message and closed before replying: it may have accepted
    it, so the error says so (4.4.2, temporary) and the connection is not reused."""
    async with scripted(after_message=lambda writer: False) as server:
        pool = pool_for(server.port)
        try:
            session = await pool.begin("agent@kw.test", [], smtputf8=False)
            await session.rcpt("a@example.test", [])
            with pytest.raises(UpstreamOutcomeUnknownError) as unknown:
                await session.data(outgoing())
            assert (unknown.value.code, unknown.value.status) == (451, "4.4.2")
            await session.release(reusable=True)
            assert (pool.busy, pool.idle) == (0, 0)
        finally:
            await pool.close()


async def test_close_says_quit_on_idle_connections() -> None:
    async with scripted() as server:
        pool = pool_for(server.port)
        await send(pool, "a@example.test")
        await pool.close()
        assert server.commands[-1] == "QUIT"
        assert [c.split(":")[0] for c in server.commands] == [
            "EHLO relay.test", "MAIL FROM", "RCPT TO", "DATA", "QUIT"]


async def test_a_session_released_after_close_closes_its_connection() -> None:
    """A transaction that held a connection when the pool closed (a reload, a shutdown)
    finishes on it; handed back, the connection is closed rather than kept idle."""
    async with scripted() as server:
        pool = pool_for(server.port)
        session = await pool.begin("agent@kw.test", [], smtputf8=False)
        await pool.close()
        await session.rcpt("a@example.test", [])
        await session.data(outgoing())
        await session.release(reusable=True)
        assert (pool.busy, pool.idle) == (0, 0)
        assert "QUIT" not in server.commands
