"""The bulk DATA path end to end (relay/smtp/data.py, relay/message/wire.py,
relay/delivery/data.py): the bytes the upstream receives are exactly what the former
line-by-line path produced (aiosmtpd's un-stuffing, then aiosmtplib's normalisation and
stuffing), including dot-stuffed lines, bare CR and LF, and the SMTP-smuggling sequences; the
limits answer as aiosmtpd does.

The reference ("former path") is tests/data_bodies.py's, computed from aiosmtplib's own
functions and a copy of aiosmtpd 1.4.6's line rule, not from relay code. The reader and the
wire form on their own are in tests/smtp/test_data.py and tests/message/test_wire.py.
"""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from relay.message.headers import CONTROL_HEADER_PREFIX, strip_headers
from relay.store import keys
from tests.conftest import PASSWORD, add_user, wait_for
from tests.data_bodies import (
    BODIES,
    HEAD,
    pieces,
    random_message,
    stock_unstuff,
    stock_wire,
)


# -- what the relay counted and forwarded ---------------------------------------------------
async def unused(redis_client: Any, user_id: str) -> bool:
    return await redis_client.hget(keys.usage(user_id, "2026-11"), "used") in (None, "0")


def after_trace(content: bytes) -> bytes:
    """Content without the relay's Received: header (three lines)."""
    assert content.startswith(b"Received: from ")
    for _ in range(3):
        content = content[content.index(b"\r\n") + 2:]
    return content


# -- a raw client: the DATA bytes exactly as given, in the pieces given -----------------------
async def raw_send(port: int, data_pieces: Sequence[bytes], *, after: bytes = b"",
                   recipients: int = 1, hang_up: bool = False) -> list[bytes]:
    """Log in, send one envelope, write ``data_pieces`` after the 354 (each flushed on its
    own), then ``after``; return every reply line read from DATA on (none with
    ``hang_up``: the connection is closed right after the pieces)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        lines = [await reader.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(await reader.readline())
        return lines[-1]

    try:
        assert (await reply()).startswith(b"220")
        auth = base64.b64encode(b"\0agent@kw.test\0" + PASSWORD.encode())
        for command in (b"EHLO client.test", b"AUTH PLAIN " + auth,
                        b"MAIL FROM:<agent@kw.test>",
                        *(f"RCPT TO:<r{n}@example.test>".encode() for n in range(recipients))):
            writer.write(command + b"\r\n")
            answer = await reply()
            assert answer[:1] == b"2", (command, answer)
        writer.write(b"DATA\r\n")
        assert (await reply()).startswith(b"354")
        for piece in data_pieces:
            writer.write(piece)
            await writer.drain()
        if hang_up:
            return []
        writer.write(after)
        replies = [await reply()]
        if after:
            replies.append(await reply())
        return replies
    finally:
        writer.close()


@pytest.mark.parametrize("name", sorted(BODIES))
async def test_upstream_receives_what_the_former_path_sent(name, make_relay, upstream,
                                                           accounts):
    await add_user(accounts)
    relay = await make_relay(upstream=upstream)
    raw = HEAD + BODIES[name]
    replies = await raw_send(relay.port, [raw + b".\r\n"])
    assert replies[0].startswith(b"250 2.0.0"), replies
    captured = upstream.messages[0].content
    # The capturing upstream is aiosmtpd, so it un-stuffs what it got, as any server would.
    expected = stock_unstuff(stock_wire(stock_unstuff(raw)))
    assert after_trace(captured) == expected


async def test_random_messages_in_random_pieces_match_the_former_path(make_relay, upstream,
                                                                      accounts):
    """Seeded: 150 messages, each written in random pieces (so a CRLF or the terminator can
    straddle two network reads)."""
    await add_user(accounts)
    relay = await make_relay(upstream=upstream)
    rng = random.Random(5321)
    for n in range(150):
        raw = random_message(rng)
        replies = await raw_send(relay.port, pieces(raw + b".\r\n", rng))
        assert replies[0].startswith(b"250 2.0.0"), (raw, replies)
        got = after_trace(upstream.messages[n].content)
        # X-KW-* header fields are stripped; the reference strips them the same way.
        assert got == stock_unstuff(stock_wire(strip_headers(stock_unstuff(raw),
                                                           (CONTROL_HEADER_PREFIX,)))), raw


async def test_a_smuggled_second_message_is_content_of_the_first(make_relay, upstream,
                                                                 accounts, redis_client):
    """``\\n.\\n`` then a whole envelope: one message upstream (carrying the text), one send
    counted."""
    user = await add_user(accounts)
    relay = await make_relay(upstream=upstream)
    smuggled = (b"\n.\nMAIL FROM:<agent@kw.test>\r\nRCPT TO:<victim@example.test>\r\n"
                b"DATA\r\nSubject: smuggled\r\n\r\nx\r\n")
    replies = await raw_send(relay.port, [HEAD + b"hi\r\n" + smuggled + b".\r\n"])
    assert replies[0].startswith(b"250 2.0.0")
    assert len(upstream.messages) == 1
    assert upstream.messages[0].rcpt_tos == ["r0@example.test"]
    assert b"RCPT TO:<victim@example.test>" in upstream.messages[0].content
    usage = await redis_client.hget(keys.usage(user.id, "2026-11"), "used")
    assert usage == "1"


async def test_a_command_pipelined_after_the_dot_is_answered(make_relay, upstream, accounts):
    """Bytes after ".\\r\\n" in the same write are the next command, not data."""
    await add_user(accounts)
    relay = await make_relay(upstream=upstream)
    replies = await raw_send(relay.port, [HEAD + b"hi\r\n.\r\nNOOP\r\n"], after=b"QUIT\r\n")
    assert replies[0].startswith(b"250 2.0.0")
    assert replies[1].startswith(b"250")  # the NOOP's reply
    assert after_trace(upstream.messages[0].content) == HEAD + b"hi\r\n"


async def test_a_large_message_arrives_intact(make_relay, upstream, accounts):
    """3 MB in wire form with stuffed lines throughout, written in 7 KB pieces."""
    await add_user(accounts)
    relay = await make_relay(upstream=upstream)
    line = b"..dotted " + b"y" * 60 + b"\r\n" + b"plain " + b"z" * 70 + b"\r\n"
    raw = HEAD + line * (3_000_000 // len(line))
    chunked = [raw[i:i + 7000] for i in range(0, len(raw), 7000)] + [b".\r\n"]
    replies = await raw_send(relay.port, chunked)
    assert replies[0].startswith(b"250 2.0.0")
    assert after_trace(upstream.messages[0].content) == stock_unstuff(raw)


async def test_a_client_gone_in_the_middle_of_data_is_refunded(make_relay, upstream, accounts,
                                                                redis_client):
    """Half a body, then the connection closes: nothing upstream, the unit given back, a
    log line and no traceback."""
    user = await add_user(accounts)
    relay = await make_relay(upstream=upstream)
    with capture_logs() as logs:
        await raw_send(relay.port, [HEAD + b"half a body\r\n" * 100], hang_up=True)
        await wait_for(lambda: unused(redis_client, user.id))
    events = [e["event"] for e in logs]
    assert "data.connection_lost" in events
    assert "session.exception" not in events
    assert upstream.messages == []


# -- limits: the same replies as aiosmtpd, nothing forwarded or counted ------------------------
@pytest.mark.parametrize(("line", "accepted"), [
    (b"x" * 999 + b"\r\n", True),    # 1001 bytes with CRLF: aiosmtpd's limit, accepted
    (b"x" * 1000 + b"\r\n", False),  # 1002: refused
    (b"x" * 5000 + b"\r\n", False),
    (b"x" * 999 + b"\r\r\n", False),  # the bare CR counts: 1002
])
async def test_line_length_limit_matches_aiosmtpd(line, accepted, make_relay, upstream,
                                                  accounts, redis_client):
    user = await add_user(accounts)
    relay = await make_relay(upstream=upstream)
    rng = random.Random(len(line))
    replies = await raw_send(relay.port, pieces(HEAD + line + b"after\r\n.\r\n", rng),
                             after=b"NOOP\r\n")
    if accepted:
        assert replies[0].startswith(b"250 2.0.0")
        assert len(upstream.messages) == 1
    else:
        assert replies[0] == b"500 5.5.6 Line too long (see RFC 5321 4.5.3.1.6)\r\n"
        assert replies[1].startswith(b"250")  # the session goes on
        assert upstream.messages == []
        await wait_for(lambda: unused(redis_client, user.id))  # the reservation is refunded


async def test_size_limit_answers_552_after_the_dot_and_counts_nothing(make_relay, upstream,
                                                                       accounts, redis_client):
    user = await add_user(accounts)
    relay = await make_relay(upstream=upstream, max_message_size=10_000)
    body = (b"y" * 98 + b"\r\n") * 200  # 20 KB
    with capture_logs() as logs:
        replies = await raw_send(relay.port, [HEAD, body, b".\r\n"], after=b"NOOP\r\n")
    assert replies[0] == b"552 5.3.4 Message too big for system\r\n"
    refused = [e for e in logs if e["event"] == "data.refused"]
    assert [(e["reason"], e["size"]) for e in refused] == [("too_much", len(HEAD + body))]
    assert replies[1].startswith(b"250")
    assert upstream.messages == []
    await wait_for(lambda: unused(redis_client, user.id))
