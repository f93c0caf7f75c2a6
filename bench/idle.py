"""Memory per idle connection: ``n`` clients connect, EHLO and AUTH, then wait; the relay's
RSS (every worker) is read before and while they wait (issue 15: at most 50 KB each).

The clients come from many loopback addresses (127.0.1.x, a hundred connections each), so
the relay's production limits (``RELAY_MAX_CONNECTIONS_PER_IP``, 200 per process) stay as
they are. Raw sockets, not aiosmtplib: a thousand client objects would cost the generator
more than the sessions cost the relay.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
from collections import Counter
from dataclasses import dataclass

from bench.procs import HOST, Meter

PER_SOURCE = 100
# Enough connections for every worker to have served a few.
WARM_UP = 60
# A connection that is not through EHLO and AUTH in this time is counted as not opened.
OPEN_TIMEOUT = 60.0
LOCAL_HOSTNAME = b"idle.bench.invalid"


@dataclass(frozen=True, slots=True)
class IdleMemory:
    connections: int
    opened: int
    rss_before: int
    rss_idle: int
    failures: dict[str, int]

    @property
    def per_connection(self) -> float:
        return max(0, self.rss_idle - self.rss_before) / max(1, self.opened)


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One whole SMTP reply (the last line has a space after the code)."""
    while True:
        line = await reader.readline()
        if not line or line[3:4] != b"-":
            return line


# Why a connection did not get through EHLO and AUTH (the reply's start, or the error).
FAILURES: Counter[str] = Counter()


async def _open(index: int, port: int, login: tuple[str, str]
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    source = f"127.0.{1 + index // PER_SOURCE // 250}.{1 + index // PER_SOURCE % 250}"
    try:
        reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
        greeting = await _reply(reader)
        if not greeting.startswith(b"220"):
            FAILURES[greeting[:40].decode(errors="replace") or "closed"] += 1
            writer.close()
            return None
        writer.write(b"EHLO " + LOCAL_HOSTNAME + b"\r\n")
        await _reply(reader)
        token = base64.b64encode(f"\0{login[0]}\0{login[1]}".encode())
        writer.write(b"AUTH PLAIN " + token + b"\r\n")
        answer = await _reply(reader)
        if not answer.startswith(b"235"):
            FAILURES[answer[:40].decode(errors="replace") or "closed"] += 1
            writer.close()
            return None
        return reader, writer
    except OSError as exc:
        FAILURES[type(exc).__name__] += 1
        return None


async def _open_many(first: int, count: int, port: int, login: tuple[str, str]
                     ) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    async def one(index: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.wait_for(_open(index, port, login), OPEN_TIMEOUT)
        except TimeoutError:
            return None
    found = await asyncio.gather(*(one(i) for i in range(first, first + count)))
    return [c for c in found if c is not None]


def _close(opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in opened:
        with contextlib.suppress(OSError):
            writer.write(b"QUIT\r\n")
            writer.close()


async def _measure(port: int, login: tuple[str, str], n: int, meter: Meter,
                   settle: float) -> IdleMemory:
    # A warm-up first, so that what is measured is the sessions, not the first AUTH of each
    # worker (its scrypt check and thread pool) or the first use of a code path.
    _close(await _open_many(n, WARM_UP, port, login))
    await asyncio.sleep(settle)
    FAILURES.clear()
    before = meter.usage().rss
    opened = await _open_many(0, n, port, login)
    # The relay's allocator settles after the burst of set-ups; then the idle sessions are
    # what remains.
    await asyncio.sleep(settle)
    idle = meter.usage().rss
    _close(opened)
    return IdleMemory(n, len(opened), before, idle, dict(FAILURES))


def measure_idle(port: int, login: tuple[str, str], n: int, meter: Meter,
                 settle: float = 2.0) -> IdleMemory:
    gc.collect()
    return asyncio.run(_measure(port, login, n, meter, settle))
