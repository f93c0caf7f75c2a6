"""The bulk DATA path (relay.smtpdata, relay.wire, upstream.send_data): the bytes the
upstream receives are exactly what the former line-by-line path produced (aiosmtpd's
un-stuffing, then aiosmtplib's normalisation and stuffing), including dot-stuffed lines, bare
CR and LF, and the SMTP-smuggling sequences; the limits answer as aiosmtpd does.

The reference ("former path") is tests/data_bodies.py's, computed from aiosmtplib's own
functions and a copy of aiosmtpd 1.4.6's line rule, not from relay code.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import random
from collections.abc import Sequence
from typing import Any

import pytest
from aiosmtplib.protocol import normalize_message_line_endings
from structlog.testing import capture_logs

from relay.message.headers import strip_control_headers
from relay.message.wire import WireMessage, is_clean_wire, stuff, unstuff
from relay.smtp.data import DataProblem, read_data
from relay.store import keys
from tests.conftest import PASSWORD, add_user, wait_for
from tests.data_bodies import (
    BODIES,
    HEAD,
    LINE_LIMIT,
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
        assert got == stock_unstuff(stock_wire(strip_control_headers(stock_unstuff(raw)))), raw


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


# -- the reader on its own: every way of cutting the stream ------------------------------------
async def read_all(data: bytes, cuts: Sequence[int], *, size_limit: int | None = None) -> tuple[
        bytes, DataProblem | None, bytes]:
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    bounds = [0, *cuts, len(data)]
    task = asyncio.ensure_future(read_data(reader, size_limit=size_limit, line_limit=LINE_LIMIT))
    for a, b in itertools.pairwise(bounds):
        reader.feed_data(data[a:b])
        await asyncio.sleep(0)
    reader.feed_eof()
    result = await task
    rest = await reader.read()
    joined = b"".join(result.chunks)
    # The reader's piece-by-piece verdict is the whole's.
    assert result.clean == (result.problem is None and is_clean_wire(joined)), data
    return joined, result.problem, rest


@pytest.mark.parametrize("body", [b"", b"a\r\n", b"\r\n", b"\r\n\r\n", b"..\r\n", b"x.\r\n",
                                  b"a\r\n.x\r\n", b"\n.\n\r\n", b"\r.\r\r\n"])
async def test_reader_finds_the_terminator_wherever_the_reads_are_cut(body):
    data = body + b".\r\nNEXT\r\n"
    for cut in range(1, len(data)):
        raw, problem, rest = await read_all(data, [cut])
        assert (raw, problem, rest) == (body, None, b"NEXT\r\n"), cut
    raw, problem, rest = await read_all(data, list(range(1, len(data))))  # byte by byte
    assert (raw, problem, rest) == (body, None, b"NEXT\r\n")


async def test_reader_line_meter_counts_lines_split_across_reads():
    ok = b"a" * 999 + b"\r\n"
    long = b"a" * 1000 + b"\r\n"
    for data, problem in ((ok * 3, None), (ok + long + ok, DataProblem.LINE_TOO_LONG)):
        for cut in (998, 999, 1000, 1001, 1002, 1500, 2001, 2002, 2003):
            got = await read_all(data + b".\r\n", [cut])
            assert got[1] is problem, cut


async def test_reader_line_meter_matches_an_exact_measure_on_random_bodies():
    """Long stretches of short lines (the window proof) with the odd line at or over the
    limit, bare CR and LF inside lines, cut into random pieces: the verdict is the exact
    one (any line of more than 1,001 bytes with its CRLF)."""
    rng = random.Random(4531)
    for _ in range(120):
        lines = []
        for _ in range(rng.randint(1, 400)):
            length = rng.choice([rng.randint(0, 120)] * 30 + [rng.randint(990, 1010)])
            filler = bytes(rng.choice(b"ab\r\n") if rng.random() < 0.02 else 97
                           for _ in range(length))
            lines.append(filler.replace(b"\r\n", b"rn") + b"\r\n")
        raw = b"".join(lines)
        if b"\r\n.\r\n" in b"\r\n" + raw:
            continue
        exact = max(len(line) + 2 for line in raw.split(b"\r\n")[:-1]) > LINE_LIMIT
        cuts = sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randint(0, 6))))
        _, problem, _ = await read_all(raw + b".\r\n", cuts)
        assert (problem is DataProblem.LINE_TOO_LONG) is exact


# -- the wire form ---------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"a\r\n", b".a\r\n", b"a\r\n.\r\n..\r\n", b"a\nb",
                                     b"a\rb\r\n", b"\r\n.", b"x" * 10])
def test_stuff_is_aiosmtplib_and_unstuff_reverses_it(content):
    wire = stuff(content)
    assert wire == (stock_wire(content) if content else b"")
    assert is_clean_wire(wire)
    assert unstuff(wire) == normalize_message_line_endings(content) if content else True


@pytest.mark.parametrize(("raw", "clean"), [
    (b"a\r\n", True), (b"..a\r\n", True), (b"a\r\n..b\r\n", True), (b"", True),
    (b".a\r\n", False), (b"a\r\n.b\r\n", False), (b"a\nb\r\n", False), (b"a\rb\r\n", False),
    (b"a", False),
])
def test_is_clean_wire(raw, clean):
    assert is_clean_wire(raw) is clean
    assert (stuff(unstuff(raw)) == raw) is clean or not raw.endswith(b"\r\n")


def test_outgoing_is_the_received_pieces_when_nothing_changes():
    pieces_in = [HEAD[:10], HEAD[10:] + b"..x\r\n", b"body\r\n"]
    chunks = WireMessage(pieces_in).outgoing(b"Received: x\r\n", (b"x-kw-",)).chunks
    assert chunks[0] == b"Received: x\r\n"
    assert all(a is b for a, b in zip(chunks[1:], pieces_in, strict=True))  # not copies
    with_control = [b"X-KW-Route: m\r\n" + HEAD[:5], HEAD[5:] + b"..x\r\n", b"more\r\n"]
    chunks = WireMessage(with_control).outgoing(b"R: x\r\n", (b"x-kw-",)).chunks
    assert chunks[-1] is with_control[-1]
    assert isinstance(chunks[-2], memoryview) and chunks[-2].obj is with_control[1]
    assert b"".join(chunks) == b"R: x\r\n" + HEAD + b"..x\r\nmore\r\n"


async def test_reader_verdict_matches_the_whole_for_random_pieces():
    rng = random.Random(1870)
    for _ in range(300):
        raw = random_message(rng)
        cuts = sorted(rng.sample(range(1, len(raw) + 3), min(len(raw) + 2, rng.randint(0, 9))))
        joined, problem, _ = await read_all(raw + b".\r\n", cuts)  # asserts the verdict
        assert (joined, problem) == (raw, None)


def test_capture_receives_content(tmp_path):
    """The capture folder gets content (un-stuffed), as before."""
    out = WireMessage([HEAD + b"..x\r\n"]).outgoing(b"R: 1\r\n", ())
    assert out.content() == b"R: 1\r\n" + HEAD + b".x\r\n"
