"""Load clients for the fault scenarios: raw SMTP over asyncio streams that record, for the
ledger (tests/ledger.py), every reply each transaction got, and that can vanish at any SMTP
step with a plain close (FIN) or a reset (RST, SO_LINGER 0).

Every message carries a unique ``X-Ledger-Id`` header (and Message-ID), so the upstream's
captures match client transactions and a duplicate is seen.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.conftest import PASSWORD, wait_for
from tests.ledger import NO_REPLY, ClientTxn

_ids = itertools.count(1)


def new_ledger_id(prefix: str = "L") -> str:
    return f"{prefix}{time.monotonic_ns():x}-{next(_ids)}"


class Lost(Exception):
    """The connection died (or the relay closed it) before a reply came."""


@dataclass(frozen=True)
class Account:
    login: str
    sender: str
    password: str = PASSWORD


@dataclass
class Message:
    ledger_id: str
    content: bytes        # headers, blank line, body; without the final dot
    body_sha256: str


def make_message(ledger_id: str, sender: str, rcpts: list[str], *, lines: int = 3,
                 line_length: int = 60, header_line: int = 0) -> Message:
    """A message with the ledger id in its headers; ``lines`` body lines of
    ``line_length`` bytes (never starting with a dot); ``header_line``: one extra header
    line that long (to test the line-length limit)."""
    to = ", ".join(rcpts[:3]) + (", ..." if len(rcpts) > 3 else "")
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: ledger {ledger_id}\r\n"
            f"Message-ID: <{ledger_id}@ledger.test>\r\nX-Ledger-Id: {ledger_id}\r\n").encode()
    if header_line:
        head += b"X-Long: " + b"h" * header_line + b"\r\n"
    filler = (b"abcdefghijklmnopqrstuvwxyz0123456789" * (line_length // 36 + 1))[:line_length]
    body = b"".join(b"%08d " % i + filler[9:] + b"\r\n" for i in range(lines))
    return Message(ledger_id, head + b"\r\n" + body, hashlib.sha256(body).hexdigest())


class Conn:
    """One SMTP connection: commands and replies, timings per step, and a way to vanish."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 relay: str, timeout: float) -> None:
        self.reader, self.writer = reader, writer
        self.relay = relay
        self.timeout = timeout
        self.slowest: dict[str, float] = {}
        self.on_close: Callable[[Conn], None] | None = None
        self.closed = False

    @classmethod
    async def open(cls, port: int, relay: str = "", *, seconds: float = 60,
                   source: str = "127.0.0.1") -> Conn:
        """Connected and greeted; ``seconds`` bounds every later step too."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)), seconds)
        except OSError as exc:
            raise Lost(f"connect: {exc}") from None
        conn = cls(reader, writer, relay, seconds)
        try:
            code, text = await conn.reply("banner")
        except Lost:
            conn.drop()
            raise
        if code != 220:
            conn.drop()
            raise Lost(f"banner {code} {text}")
        return conn

    async def reply(self, step: str = "") -> tuple[int, str]:
        """One reply (multi-line joined); raises Lost when the connection ends first."""
        started = time.monotonic()
        lines = []
        try:
            while True:
                line = await asyncio.wait_for(self.reader.readline(), self.timeout)
                if not line.endswith(b"\n"):
                    raise Lost(f"closed while waiting for the {step} reply")
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(text[4:])
                if text[3:4] != "-":
                    break
        except (ConnectionError, OSError) as exc:
            raise Lost(f"{step}: {exc}") from None
        if step:
            elapsed = time.monotonic() - started
            self.slowest[step] = max(self.slowest.get(step, 0.0), elapsed)
        try:
            return int(text[:3]), "\n".join(lines)
        except ValueError:
            raise Lost(f"garbled {step} reply {text!r}") from None

    async def write(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        except (ConnectionError, OSError) as exc:
            raise Lost(f"write: {exc}") from None

    async def command(self, line: str | bytes, step: str) -> tuple[int, str]:
        await self.write((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply(step)

    async def login(self, account: Account) -> tuple[int, str]:
        code, text = await self.command("EHLO load.test", "ehlo")
        if code != 250:
            return code, text
        token = base64.b64encode(f"\0{account.login}\0{account.password}".encode()).decode()
        return await self.command(f"AUTH PLAIN {token}", "auth")

    def drop(self, reset: bool = False) -> None:
        """Close without QUIT: a FIN, or with ``reset`` an RST (SO_LINGER 0), as a crashed
        client or a dead network does."""
        self.closed = True
        if self.on_close is not None:
            self.on_close(self)
        if reset:
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                except OSError:
                    pass
            self.writer.transport.abort()
        else:
            self.writer.close()

    async def quit(self) -> None:
        try:
            await self.command("QUIT", "quit")
        except Lost:
            pass
        self.drop()


# Where a client may vanish in a transaction: mid-RCPT (a recipient accepted, the next one
# half written), after 354, in the middle of the body, right after the final dot.
VANISH_STEPS = ("rcpt", "data", "body", "dot")


async def transact(conn: Conn, account: Account, rcpts: list[str], message: Message, *,
                   vanish: str | None = None, reset: bool = False,
                   pipeline: bool = False) -> ClientTxn:
    """One transaction on a logged-in connection, every reply recorded. ``vanish``: drop the
    connection at that step (see VANISH_STEPS). ``pipeline``: all RCPTs in one write
    (RFC 2920), the replies read after. Raises nothing: a lost connection is recorded in
    ``lost_at`` (and the caller must drop the connection)."""
    txn = ClientTxn(message.ledger_id, account.sender, relay=conn.relay,
                    body_sha256=message.body_sha256)
    step = "mail"
    try:
        code, _ = await conn.command(f"MAIL FROM:<{account.sender}>", "mail")
        if code != 250:
            return txn
        step = "rcpt"
        if pipeline:
            await conn.write(b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts))
            for rcpt in rcpts:
                txn.rcpts.append((rcpt, NO_REPLY))
                txn.rcpts[-1] = (rcpt, (await conn.reply("rcpt"))[0])
        else:
            for rcpt in rcpts:
                # Recorded before the reply: a relay that dies after reserving the unit and
                # before answering leaves it in flight (NO_REPLY), not unaccounted for.
                txn.rcpts.append((rcpt, NO_REPLY))
                txn.rcpts[-1] = (rcpt, (await conn.command(f"RCPT TO:<{rcpt}>", "rcpt"))[0])
                if vanish == "rcpt" and txn.accepted:
                    await conn.write(b"RCPT TO:<half-writ")
                    txn.lost_at = "rcpt"
                    conn.drop(reset)
                    return txn
        if not txn.accepted:
            await conn.command("RSET", "rset")
            return txn
        step = "data"
        code, _ = await conn.command("DATA", "data")
        if code != 354:
            return txn
        if vanish == "data":
            txn.lost_at = "data"
            conn.drop(reset)
            return txn
        step = "body"
        if vanish == "body":
            await conn.write(message.content[: len(message.content) // 2])
            txn.lost_at = "body"
            conn.drop(reset)
            return txn
        await conn.write(message.content + b".\r\n")
        txn.dot_sent = True
        if vanish == "dot":
            txn.lost_at = "dot"
            conn.drop(reset)
            return txn
        step = "dot"
        txn.data_code, txn.data_reply = await conn.reply("dot")
    except Lost:
        txn.lost_at = step
        if step == "rcpt" and pipeline:
            txn.rcpts += [(r, NO_REPLY) for r in rcpts[len(txn.rcpts):]]
    return txn


@dataclass
class LoadStats:
    connects: int = 0
    connect_failures: int = 0
    auth_refusals: int = 0
    lost: int = 0
    slowest: dict[str, float] = field(default_factory=dict)

    def note(self, conn: Conn) -> None:
        for step, seconds in conn.slowest.items():
            self.slowest[step] = max(self.slowest.get(step, 0.0), seconds)


Recipients = Callable[[int], list[str]]


def plain_recipients(count: int = 2, prefix: str = "r") -> Recipients:
    return lambda n: [f"{prefix}{n}-{k}@example.test" for k in range(count)]


class Load:
    """``concurrency`` clients sending transactions through the relays in ``ports`` (name ->
    port, taken in turn), ``per_connection`` per connection, until ``target`` transactions
    are recorded (a scenario may raise ``target`` while the load runs) or ``max_seconds``
    pass. A temporary refusal or a lost connection makes a client pause a moment and
    reconnect; a connection or AUTH that fails is counted in ``stats``, not recorded."""

    def __init__(self, ports: dict[str, int], accounts: list[Account], *,
                 transactions: int, concurrency: int = 8, per_connection: int = 5,
                 recipients: Recipients | None = None, lines: int = 3,
                 line_length: int = 60, pause: float = 0.05, timeout: float = 60,
                 max_seconds: float = 120, prefix: str = "L") -> None:
        self.ports = ports
        self.accounts = accounts
        self.target = transactions
        self.concurrency = concurrency
        self.per_connection = per_connection
        self.recipients = recipients or plain_recipients()
        self.lines, self.line_length = lines, line_length
        self.pause = pause
        self.timeout = timeout
        self.max_seconds = max_seconds
        self.prefix = prefix
        self.records: list[ClientTxn] = []
        self.stats = LoadStats()
        self._numbers = itertools.count()
        self._relays = itertools.cycle(list(ports.items()))
        self._deadline = 0.0
        self._open: set[Conn] = set()

    @property
    def done(self) -> int:
        return len(self.records)

    def acked(self) -> int:
        return sum(1 for t in self.records if t.outcome == "acked")

    def refusals(self) -> int:
        """Transactions not acknowledged, and connections or AUTHs that failed."""
        return (self.done - self.acked() + self.stats.connect_failures
                + self.stats.auth_refusals)

    async def more(self, *, acked: int = 0, done: int = 0, refused: int = 0,
                   seconds: float = 30) -> None:
        """Wait until, counted from now, ``acked`` more transactions were acknowledged,
        ``done`` more recorded and ``refused`` more refusals seen (the load runs meanwhile)."""
        want = (self.acked() + acked, self.done + done, self.refusals() + refused)
        await wait_for(lambda: all(now >= wanted for now, wanted in zip(
            (self.acked(), self.done, self.refusals()), want, strict=True)), seconds)

    def stop(self) -> None:
        """Let each client finish its transaction and QUIT."""
        self.target = 0

    def _more(self) -> bool:
        return self.done < self.target and time.monotonic() < self._deadline

    async def run(self) -> None:
        self._deadline = time.monotonic() + self.max_seconds
        try:
            await asyncio.gather(*(self._client(i) for i in range(self.concurrency)))
        finally:
            for conn in list(self._open):  # cancelled (a failed test): no socket left open
                conn.drop()

    async def _connect(self, account: Account) -> Conn | None:
        relay, port = next(self._relays)
        self.stats.connects += 1
        conn = None
        try:
            conn = await Conn.open(port, relay, seconds=self.timeout)
            code, _ = await conn.login(account)
        except Lost:
            if conn is not None:
                conn.drop()
            self.stats.connect_failures += 1
            await asyncio.sleep(self.pause)
            return None
        if code != 235:
            self.stats.auth_refusals += 1
            await conn.quit()
            await asyncio.sleep(self.pause)
            return None
        conn.on_close = self._open.discard
        self._open.add(conn)
        return conn

    async def _client(self, worker: int) -> None:
        account = self.accounts[worker % len(self.accounts)]
        conn: Conn | None = None
        used = 0
        while self._more():
            if conn is None:
                conn = await self._connect(account)
                used = 0
                continue
            number = next(self._numbers)
            rcpts = self.recipients(number)
            message = make_message(new_ledger_id(f"{self.prefix}{number}-"), account.sender,
                                   rcpts, lines=self.lines, line_length=self.line_length)
            txn = await transact(conn, account, rcpts, message)
            self.records.append(txn)
            used += 1
            if txn.lost_at:
                self.stats.lost += 1
                self.stats.note(conn)
                conn.drop()
                conn = None
                await asyncio.sleep(self.pause)
                continue
            if txn.data_code != 250:
                await asyncio.sleep(self.pause)  # refused: a real client would wait too
            if used >= self.per_connection:
                self.stats.note(conn)
                await conn.quit()
                conn = None
        if conn is not None:
            self.stats.note(conn)
            await conn.quit()


async def send_one(port: int, account: Account, rcpts: list[str], *, relay: str = "",
                   prefix: str = "one", vanish: str | None = None, reset: bool = False,
                   lines: int = 3, line_length: int = 60, header_line: int = 0,
                   pipeline: bool = False, seconds: float = 60) -> ClientTxn:
    """One connection, one transaction (then QUIT, or the vanish), recorded."""
    message = make_message(new_ledger_id(prefix), account.sender, rcpts, lines=lines,
                           line_length=line_length, header_line=header_line)
    try:
        conn = await Conn.open(port, relay, seconds=seconds)
    except Lost:
        return ClientTxn(message.ledger_id, account.sender, relay=relay, lost_at="connect")
    try:
        code, _ = await conn.login(account)
    except Lost:
        conn.drop()
        return ClientTxn(message.ledger_id, account.sender, relay=relay, lost_at="auth")
    if code != 235:
        await conn.quit()
        return ClientTxn(message.ledger_id, account.sender, relay=relay)
    txn = await transact(conn, account, rcpts, message, vanish=vanish, reset=reset,
                         pipeline=pipeline)
    if txn.lost_at:
        if not conn.closed:  # lost before the step it was to vanish at
            conn.drop()
    else:
        await conn.quit()
    return txn
