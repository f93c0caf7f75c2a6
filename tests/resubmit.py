"""Helpers of the resubmission flows (tests/flows/test_resubmission*.py): messages that carry
a Message-ID and a ledger id, one client attempt recorded for the ledger (tests/ledger.py),
a client that loses the relay's reply to its DATA, and an upstream that loses its own."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import Envelope, Session

from relay.process.wiring import RelayApp
from tests.conftest import PASSWORD, CapturingHandler, CapturingUpstream, smtp_client
from tests.ledger import (
    Capture,
    ClientTxn,
    Counts,
    Ledger,
    LedgerReport,
    LedgerUser,
    capture_of,
    read_counts,
)

PERIOD = "2026-11"  # the conftest clock's month


def compose(ident: str, *, sender: str = "agent@kw.test", message_id: str | None = "",
            extra: str = "") -> bytes:
    """A message with ledger id ``ident`` and, by default, the Message-ID <ident@app.test>
    (None: no Message-ID)."""
    mid = f"<{ident}@app.test>" if message_id == "" else message_id
    head = f"From: {sender}\r\nTo: contact@example.test\r\nSubject: {ident}\r\n"
    if mid is not None:
        head += f"Message-ID: {mid}\r\n"
    return (head + f"X-Ledger-Id: {ident}\r\n{extra}\r\nBody of {ident}\r\n").encode()


async def attempt(app: RelayApp, ident: str, rcpts: list[str], content: bytes, *,
                  login: str = "agent@kw.test", sender: str = "agent@kw.test",
                  relay: str = "") -> ClientTxn:
    """One transaction by a real client, every reply recorded."""
    txn = ClientTxn(ident, sender, relay=relay)
    async with smtp_client(app, login=login) as client:
        await client.mail(sender)
        for rcpt in rcpts:
            try:
                await client.rcpt(rcpt)
                txn.rcpts.append((rcpt, 250))
            except aiosmtplib.SMTPRecipientRefused as refused:
                txn.rcpts.append((rcpt, refused.code))
        if not txn.accepted:
            await client.rset()
            return txn
        try:
            reply = await client.data(content)
            txn.data_code, txn.data_reply = reply.code, reply.message
        except aiosmtplib.SMTPDataError as refused:
            txn.data_code, txn.data_reply = refused.code, refused.message
        txn.dot_sent = True
    return txn


async def attempt_losing_the_reply(app: RelayApp, ident: str, rcpts: list[str],
                                   content: bytes) -> ClientTxn:
    """The whole message, final dot included, then the connection reset before the relay's
    reply to DATA can be read: the app never learns the outcome (the relay finishes the
    delivery in a task of its own)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)

    async def say(line: bytes) -> str:
        writer.write(line)
        await writer.drain()
        return await read_reply(reader)

    await read_reply(reader)
    await say(b"EHLO app.test\r\n")
    token = base64.b64encode(b"\0agent@kw.test\0" + PASSWORD.encode())
    assert (await say(b"AUTH PLAIN " + token + b"\r\n")).startswith("235")
    assert (await say(b"MAIL FROM:<agent@kw.test>\r\n")).startswith("250")
    txn = ClientTxn(ident, "agent@kw.test")
    for rcpt in rcpts:
        txn.rcpts.append((rcpt, int((await say(f"RCPT TO:<{rcpt}>\r\n".encode()))[:3])))
    assert (await say(b"DATA\r\n")).startswith("354")
    writer.write(content + b".\r\n")
    await writer.drain()
    writer.transport.abort()
    txn.dot_sent, txn.lost_at = True, "dot"
    return txn


async def read_reply(reader: asyncio.StreamReader) -> str:
    lines = []
    while True:
        line = (await asyncio.wait_for(reader.readline(), 10)).decode()
        lines.append(line.rstrip("\r\n"))
        if len(line) < 4 or line[3] != "-":
            return "\n".join(lines)


class ReplyLosingHandler(CapturingHandler):
    """The capturing upstream, which can lose its reply to DATA: ``lose_after`` messages it
    takes (captured, so accepted) and ``lose_before`` it never takes, closing the connection
    instead of answering either way: the relay cannot know which happened."""

    lose_after = 0
    lose_before = 0

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        if self.lose_before:
            self.lose_before -= 1
            server.transport.abort()
            return "421 4.4.2 gone"
        reply = await super().handle_DATA(server, session, envelope)
        if self.lose_after:
            self.lose_after -= 1
            server.transport.abort()
        return reply


def losing(upstream: CapturingUpstream) -> ReplyLosingHandler:
    """``upstream`` with a ReplyLosingHandler (set before it is first connected to)."""
    handler = ReplyLosingHandler(upstream.behaviour)
    upstream.handler = handler
    return handler


def captures(*upstreams: CapturingUpstream) -> list[Capture]:
    return [capture_of(m.content, m.mail_from, m.rcpt_tos)
            for upstream in upstreams for m in upstream.messages]


async def ledger(redis: Any, users: list[LedgerUser], clients: list[ClientTxn],
                 *upstreams: CapturingUpstream, name: str = "resubmission") -> LedgerReport:
    counts: dict[str, Counts] = await read_counts(redis, users, [PERIOD])
    return Ledger(users).compare(name, clients, captures(*upstreams), counts)
