"""The async SMTP load generator (aiosmtplib, on uvloop when installed).

Every session connects, EHLOs, optionally upgrades with STARTTLS (and EHLOs again, RFC 3207
§4.2), authenticates with AUTH PLAIN, then sends ``per_connection`` messages (MAIL, one RCPT,
DATA) before QUIT: ``per_connection=1`` is a new connection per message, a larger number
keeps the session for that many messages. ``auth=None`` skips AUTH: only for the bare-sink
baseline and for Postfix, which are not asked to authenticate.

Every run is bounded: it stops after ``messages`` transactions or ``time_cap`` seconds,
whichever comes first. ``rate`` (messages/s over all sessions) paces the transactions
(Poisson arrivals) instead of sending as fast as possible; the latency runs use it. The
sessions' first connections carry 1..per_connection messages, spread evenly, so that the
sessions do not reconnect in lockstep.

Usable alone as well: ``python -m bench.loadgen --port 2525 --user smartplans --password …``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import random
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiosmtplib

from bench.resume import ResumingContext, resuming_context

# Sent in EHLO. Given explicitly: aiosmtplib's default is socket.getfqdn(), a DNS lookup.
LOCAL_HOSTNAME = "loadgen.bench.invalid"
RECIPIENT = "rcpt@example.com"


@dataclass(frozen=True, slots=True)
class Load:
    """One run of the generator against one SMTP server."""

    host: str
    port: int
    messages: int
    concurrency: int
    per_connection: int
    size: int
    auth: tuple[str, str] | None = None
    starttls: bool = False
    # With starttls: each session offers its previous connection's TLS session (bench/resume.py)
    resume: bool = False
    time_cap: float = 10.0
    rate: float | None = None
    senders: tuple[str, ...] = ("sender@bench.example",)
    recipient: str = RECIPIENT
    timeout: float = 60.0
    # Local addresses the sessions connect from, session k from sources[k % len]: the relay
    # limits connections per client address (RELAY_MAX_CONNECTIONS_PER_IP), so a load of
    # more sessions than one address may hold comes from several (127.0.1.x, see spread).
    # Empty: the kernel's choice (127.0.0.1).
    sources: tuple[str, ...] = ()


PER_SOURCE = 100  # sessions per local address in ``spread`` (as bench/idle.py)


def spread(sessions: int, per_source: int = PER_SOURCE) -> tuple[str, ...]:
    """Loopback addresses 127.0.1.1, 127.0.1.2, ... enough for ``sessions`` at
    ``per_source`` each (Linux routes all of 127.0.0.0/8 to the loopback interface)."""
    count = max(1, -(-sessions // per_source))
    return tuple(f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(count))


@dataclass(slots=True)
class Outcome:
    """What one run did. Latencies are seconds."""

    accepted: int = 0
    failed: int = 0
    started: float = 0.0  # perf_counter when the first session began
    connections: int = 0
    # With Load.resume: connections that offered a previous session, and those that resumed it.
    offered: int = 0
    resumed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0
    # MAIL FROM sent .. the reply to the end of DATA received: one transaction.
    txn_latencies: list[float] = field(default_factory=list)
    # connect .. AUTH accepted (or EHLO answered without AUTH): once per connection.
    setup_latencies: list[float] = field(default_factory=list)
    # Each command's own time, client side (bench/latency_profile.py): connect (to the
    # banner), ehlo, starttls, auth; mail, rcpt, data (to the 354), dot (the body to the
    # final reply). Accepted transactions and opened connections only.
    step_latencies: dict[str, list[float]] = field(default_factory=dict)

    def step(self, name: str, seconds: float) -> None:
        found = self.step_latencies.get(name)
        if found is None:
            found = self.step_latencies[name] = []
        found.append(seconds)

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed if self.elapsed > 0 else 0.0


def build_message(size: int, seed: int = 5) -> bytes:
    """A MIME message of about ``size`` bytes: headers, a text part with a few lines that
    start with a dot (dot-stuffing on the wire, RFC 5321 §4.5.2), a base64 attachment."""
    rng = random.Random(seed)
    head = (
        b"From: Agent <agent@bench.example>\r\n"
        b"To: Client <rcpt@example.com>\r\n"
        b"Subject: Benchmark message\r\n"
        b"Date: Thu, 26 Nov 2026 07:00:00 +0000\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n'
        b"\r\n"
        b"--b1\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"\r\n"
        b"Hello,\r\n"
        b".a line that starts with a dot\r\n"
        b"..and one with two\r\n"
        b"Regards\r\n"
        b"--b1\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n"
    )
    tail = b"--b1--\r\n"
    room = max(0, size - len(head) - len(tail) - 64)  # 64: the Message-ID added per message
    lines = []
    have = 0
    while have < room:
        line = base64.b64encode(rng.randbytes(57)) + b"\r\n"  # 76 characters + CRLF
        lines.append(line)
        have += len(line)
    return head + b"".join(lines) + tail


class _Schedule:
    """Hands out transaction numbers until the count or the time cap is reached; when paced,
    with Poisson arrivals at ``rate`` (seeded, so runs are comparable)."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.next = 0
        self.start = time.perf_counter()
        self.deadline = self.start + load.time_cap
        self._rng = random.Random(1)
        self._due = self.start

    def take(self) -> tuple[int, float] | None:
        """The next transaction's number and when it is due (perf_counter seconds; 0 when
        not paced), or None when the run is over."""
        if self.next >= self.load.messages or time.perf_counter() >= self.deadline:
            return None
        number = self.next
        self.next += 1
        if not self.load.rate:
            return number, 0.0
        self._due += self._rng.expovariate(self.load.rate)
        return number, self._due


def _client_tls() -> ssl.SSLContext:
    # The relay's certificate is the bench's own self-signed one; traffic stays on loopback.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def _open(load: Load, out: Outcome, tls: ssl.SSLContext,
                source: str | None) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname=load.host, port=load.port, local_hostname=LOCAL_HOSTNAME,
                             start_tls=False, timeout=load.timeout,
                             source_address=(source, 0) if source else None)
    began = time.perf_counter()
    marks = [began]
    try:
        await client.connect()
        marks.append(time.perf_counter())
        await client.ehlo()
        marks.append(time.perf_counter())
        if load.starttls:
            await client.starttls(tls_context=tls)
            await client.ehlo()
            marks.append(time.perf_counter())
            if isinstance(tls, ResumingContext):
                assert client.transport is not None
                offered, resumed = tls.keep(client.transport.get_extra_info("ssl_object"))
                out.offered += offered
                out.resumed += resumed
        if load.auth is not None:
            await client.auth_plain(*load.auth)
            marks.append(time.perf_counter())
    except BaseException:
        client.close()
        raise
    out.setup_latencies.append(marks[-1] - began)
    names = ["connect", "ehlo"] + (["starttls"] if load.starttls else []) \
        + (["auth"] if load.auth is not None else [])
    for name, start, end in zip(names, marks[:-1], marks[1:], strict=True):
        out.step(name, end - start)
    out.connections += 1
    return client


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message[:60]}"
    return type(exc).__name__


async def _session_worker(load: Load, schedule: _Schedule, out: Outcome,
                          messages: Callable[[int], bytes], tls: ssl.SSLContext,
                          first_connection: int, source: str | None) -> None:
    client: aiosmtplib.SMTP | None = None
    if load.resume:
        tls = resuming_context()  # this session's own: its sessions are offered back to it
    sent_here = 0
    quota = first_connection
    try:
        while (ticket := schedule.take()) is not None:
            number, due = ticket
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if client is None:
                try:
                    client = await _open(load, out, tls, source)
                except (aiosmtplib.SMTPException, OSError) as exc:
                    out.failed += 1
                    out.errors[f"connect: {_error_name(exc)}"] += 1
                    continue
                sent_here = 0
            sender = load.senders[number % len(load.senders)]
            began = time.perf_counter()
            marks = [began]
            try:
                await client.mail(sender)
                marks.append(time.perf_counter())
                await client.rcpt(load.recipient)
                marks.append(time.perf_counter())
                await _data(client, messages(number), load.timeout, marks)
            except aiosmtplib.SMTPResponseException as exc:
                out.failed += 1
                out.errors[_error_name(exc)] += 1
                with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                    await client.rset()
            except (aiosmtplib.SMTPException, OSError) as exc:
                out.failed += 1
                out.errors[_error_name(exc)] += 1
                client.close()
                client = None
                continue
            else:
                out.txn_latencies.append(marks[-1] - began)
                for name, start, end in zip(_TXN_STEPS, marks[:-1], marks[1:], strict=True):
                    out.step(name, end - start)
                out.accepted += 1
            sent_here += 1
            if sent_here >= quota:
                await _quit(client)
                client = None
                quota = load.per_connection
    finally:
        if client is not None:
            await _quit(client)


def wire_form(message: bytes) -> bytes:
    """``message`` as it goes on the wire after DATA: CRLF line ends, dot-stuffed
    (RFC 5321 §4.5.2), the terminating ``.CRLF``. Done once per message template, so the
    generator spends no per-message CPU on it (aiosmtplib's ``data()`` runs two regular
    expressions over the whole body for every message, 1-2 ms per 100 KB)."""
    lines = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(stuffed) + b"\r\n.\r\n"


_TXN_STEPS = ("mail", "rcpt", "data", "dot")


async def _data(client: aiosmtplib.SMTP, wire: bytes, reply_timeout: float,
                marks: list[float]) -> None:
    """DATA with a payload already in wire form (see ``wire_form``); appends to ``marks``
    when the 354 and when the final reply arrived."""
    reply = await client.execute_command(b"DATA")
    if reply.code != 354:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    marks.append(time.perf_counter())
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    # No await between the write and read_response, so the reply cannot arrive unclaimed.
    protocol.write(wire)
    reply = await protocol.read_response(timeout=reply_timeout)
    if reply.code != 250:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    marks.append(time.perf_counter())


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError):
        client.close()


async def drive(load: Load) -> Outcome:
    """Run ``load`` and return what happened; never raises for SMTP failures (they are
    counted in ``Outcome.errors``)."""
    template = wire_form(build_message(load.size))
    prefix = f"Message-ID: <{time.time_ns():x}.%d@bench.invalid>\r\n".encode()

    def message(number: int) -> bytes:
        return prefix % number + template

    out = Outcome()
    schedule = _Schedule(load)
    out.started = schedule.start
    tls = _client_tls()
    # Session k's first connection carries fewer messages, so that the sessions do not all
    # reconnect at the same moment every ``per_connection`` messages.
    pc, n = load.per_connection, load.concurrency
    sources = load.sources
    workers = [asyncio.create_task(_session_worker(
                   load, schedule, out, message, tls, 1 + (k * pc // n) % pc,
                   sources[k % len(sources)] if sources else None))
               for k in range(n)]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        # Let cancelled sessions close their connections before the loop goes away.
        await asyncio.gather(*workers, return_exceptions=True)
    out.elapsed = time.perf_counter() - schedule.start
    return out


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()  # type: ignore[no-any-return]


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401 - optional
    except ImportError:
        return "asyncio"
    return "uvloop"


_running: tuple[asyncio.AbstractEventLoop, asyncio.Task[Outcome]] | None = None
_interrupted = False


def interrupt() -> bool:
    """From a signal handler: cancel the run in progress, after which ``run`` raises
    KeyboardInterrupt. False when no run is in progress (the caller raises it itself).

    Raising KeyboardInterrupt from the handler instead is not reliable: uvloop reports an
    exception raised inside a protocol callback and carries on."""
    global _interrupted
    if _running is None:
        return False
    _interrupted = True
    loop, task = _running
    loop.call_soon_threadsafe(task.cancel)
    return True


def run(load: Load) -> Outcome:
    """``drive(load)`` on a fresh event loop (uvloop when installed)."""
    global _running, _interrupted
    loop = new_event_loop()
    task = loop.create_task(drive(load))
    _running, _interrupted = (loop, task), False
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        if _interrupted:
            raise KeyboardInterrupt from None
        raise
    except BaseException:
        task.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(task)
        raise
    finally:
        _running = None
        loop.close()


def _main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen",
                                     description="drive an SMTP server on loopback")
    parser.add_argument("--host", default="127.0.0.1", help="an IP literal (no DNS)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--per-connection", type=int, default=1,
                        help="messages per connection (1: a new connection per message)")
    parser.add_argument("--size", type=int, default=2048, help="message size in bytes")
    parser.add_argument("--user", help="AUTH PLAIN login (omit for no AUTH)")
    parser.add_argument("--password", default="")
    parser.add_argument("--sender", action="append", help="MAIL FROM (repeatable)")
    parser.add_argument("--starttls", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="with --starttls: each session resumes its previous TLS session")
    parser.add_argument("--time-cap", type=float, default=30.0)
    parser.add_argument("--rate", type=float, help="pace at this many messages/s")
    args = parser.parse_args()
    load = Load(args.host, args.port, args.messages, args.concurrency, args.per_connection,
                args.size, (args.user, args.password) if args.user else None, args.starttls,
                args.resume, args.time_cap, args.rate,
                tuple(args.sender or ["sender@bench.example"]))
    out = run(load)
    lat = sorted(out.txn_latencies)
    p = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else (lambda q: 0)
    print(f"{out.accepted} accepted, {out.failed} failed in {out.elapsed:.2f}s: "
          f"{out.rate:.0f} msg/s; p50 {p(0.5):.2f} ms, p99 {p(0.99):.2f} ms; "
          f"{out.connections} connections"
          + (f" ({out.resumed} of {out.offered} returning resumed TLS)" if load.resume else "")
          + f"; errors {dict(out.errors)}")
    return 0 if out.failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(_main())
