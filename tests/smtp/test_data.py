"""relay/smtp/data.py: the DATA command's own refusals on a real socket, and the bulk reader
on its own: the message read from a stream cut every way a network can cut it, the
terminator found wherever the reads split it, the line-length meter exact across reads, and
its piece-by-piece verdict on the wire form equal to the whole's. What reaches the upstream
through a relay is in tests/flows/test_data_path.py.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Sequence

import pytest
from structlog.testing import capture_logs

from relay.identity.accounts import AccountStore
from relay.message.wire import is_clean_wire
from relay.process.wiring import RelayApp
from relay.smtp.data import DataProblem, read_data
from tests.conftest import add_user
from tests.data_bodies import LINE_LIMIT, random_message
from tests.rawsmtp import RawSMTP


# -- the command ---------------------------------------------------------------------------
async def test_data_without_a_recipient_or_with_an_argument_is_refused_once_each(
        relay: RelayApp, accounts: AccountStore) -> None:
    """DATA before any accepted RCPT: 503; DATA with an argument: 501. Each refusal is one
    command.refused line with its code; the transaction goes on."""
    await add_user(accounts)
    raw = await RawSMTP.open(relay.port)
    try:
        await raw.login()
        assert (await raw.send(b"MAIL FROM:<agent@kw.test>\r\n")).startswith("250")
        with capture_logs() as logs:
            assert await raw.send(b"DATA\r\n") == "503 Error: need RCPT command"
            assert (await raw.send(b"RCPT TO:<a@example.test>\r\n")).startswith("250")
            assert await raw.send(b"DATA now\r\n") == "501 Syntax: DATA"
        assert [e["smtp_code"] for e in logs if e["event"] == "command.refused"] == [503, 501]
        assert (await raw.send(b"DATA\r\n")).startswith("354")
    finally:
        await raw.close()


# -- the reader ----------------------------------------------------------------------------
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


async def test_reader_verdict_matches_the_whole_for_random_pieces():
    rng = random.Random(1870)
    for _ in range(300):
        raw = random_message(rng)
        cuts = sorted(rng.sample(range(1, len(raw) + 3), min(len(raw) + 2, rng.randint(0, 9))))
        joined, problem, _ = await read_all(raw + b".\r\n", cuts)  # asserts the verdict
        assert (joined, problem) == (raw, None)
