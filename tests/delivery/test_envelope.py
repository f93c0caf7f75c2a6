"""MAIL FROM and RCPT TO written by relay/delivery/envelope.py are byte for byte what
aiosmtplib's own ``mail`` and ``rcpt`` send, for the addresses the short cut takes and for
those it leaves to aiosmtplib; and refusals raise aiosmtplib's exceptions with the reply.
A real socket: a raw server records each command line and answers with a chosen code."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiosmtplib
import pytest

from relay.delivery import envelope
from relay.message.paths import is_simple_address


class RawServer:
    """Answers 220, EHLO, then ``code`` to MAIL and RCPT; keeps every line it read."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.code = 250
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw.test ESMTP\r\n")
        while line := await reader.readline():
            self.lines.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-raw.test\r\n250-SMTPUTF8\r\n250 8BITMIME\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"%d 2.0.0 as set\r\n" % self.code)
        writer.close()


@pytest.fixture
async def raw() -> AsyncIterator[RawServer]:
    server = RawServer()
    await server.start()
    yield server
    await server.stop()


async def _client(port: int) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="relay.test",
                             start_tls=False, timeout=10)
    await client.connect()
    await client.ehlo()
    return client


ADDRESSES = [
    "agent@kw.example",                # the short cut
    "first.last+tag@sub.kw.example",   # the short cut
    "o'brien@kw.example",              # the short cut (atext includes ')
    '"john doe"@kw.example',           # a quoted local part: aiosmtplib's parser
    "user@[192.0.2.1]",                # an address literal: aiosmtplib's parser
    "agënt@kw.example",                # non-ASCII (SMTPUTF8): aiosmtplib's parser
]


@pytest.mark.parametrize("address", ADDRESSES)
async def test_commands_equal_aiosmtplibs(raw: RawServer, address: str) -> None:
    encoding = "ascii" if address.isascii() else "utf-8"
    options = ["BODY=8BITMIME"] if address.isascii() else ["SMTPUTF8"]
    sent: dict[str, list[bytes]] = {}
    ways: dict[str, tuple[Callable[..., Awaitable[object]], Callable[..., Awaitable[object]]]]
    ways = {
        "aiosmtplib": (lambda c: c.mail(address, options=options, encoding=encoding),
                       lambda c: c.rcpt(address, options=[], encoding=encoding)),
        "relay": (lambda c: envelope.mail(c, address, options, encoding),
                  lambda c: envelope.rcpt(c, address, [], encoding)),
    }
    for name, (mail, rcpt) in ways.items():
        client = await _client(raw.port)
        raw.lines.clear()
        await mail(client)
        await rcpt(client)
        sent[name] = list(raw.lines)
        await client.quit()
    assert sent["relay"] == sent["aiosmtplib"]
    assert len(sent["relay"]) == 2


def test_the_short_cut_takes_only_dot_atom_at_hostname() -> None:
    assert [is_simple_address(a) for a in ADDRESSES] == [True, True, True, False, False, False]
    for odd in ("", "<agent@kw.example>", "agent@kw.example ", "agent@-kw.example",
                "a..b@kw.example", ".a@kw.example", "agent@kw.example\r\nRSET", "agent"):
        assert not is_simple_address(odd), odd


async def test_the_null_sender(raw: RawServer) -> None:
    client = await _client(raw.port)
    raw.lines.clear()
    await envelope.mail(client, "", [], "ascii")
    assert raw.lines == [b"MAIL FROM:<>\r\n"]
    await client.quit()


@pytest.mark.parametrize("code", [451, 550])
async def test_refusals_raise_aiosmtplibs_exceptions(raw: RawServer, code: int) -> None:
    raw.code = code
    client = await _client(raw.port)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as mail_refused:
        await envelope.mail(client, "agent@kw.example", [], "ascii")
    assert (mail_refused.value.code, mail_refused.value.sender) == (code, "agent@kw.example")
    assert mail_refused.value.message == "2.0.0 as set"
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as rcpt_refused:
        await envelope.rcpt(client, "client@example.com", [], "ascii")
    assert (rcpt_refused.value.code, rcpt_refused.value.recipient) == \
        (code, "client@example.com")
    await client.quit()


async def test_251_is_accepted_like_aiosmtplib(raw: RawServer) -> None:
    raw.code = 251
    client = await _client(raw.port)
    await envelope.rcpt(client, "client@example.com", [], "ascii")
    await client.quit()
