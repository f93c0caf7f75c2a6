"""A capturing SMTP upstream in a process of its own, for the fault scenarios
(tests/flows/test_faults.py): it can be SIGKILLed mid-load and restarted on the same port, which an
upstream inside the test's event loop cannot.

    python -m tests.upstream_proc --port 2600 --capture captured.jsonl \
        [--rule PREFIX:rcpt=REPLY]... [--rule PREFIX:data=REPLY|hang]... \
        [--hold-file PATH] [--data-hang]

Every message it accepts is one JSON line in ``--capture`` (ledger id, envelope, size, body
digest), written and flushed before the 250 goes out, so the file is the truth of what the
upstream accepted even when the process is killed a moment later. Its own events (ready,
each DATA received) are JSON lines on stdout, for a test to wait on.

Rules pick replies by the local part of a recipient: ``t4:rcpt=450 4.2.1 Busy`` refuses
every recipient whose local part starts with ``t4``; ``d5:data=554 5.6.0 No`` refuses the
DATA of a message with such a recipient; ``hang:data=hang`` takes the DATA and never
answers. ``--hold-file`` holds the DATA replies of messages whose ledger id starts with what
the file says (empty: every message) while that file exists (a test removes it to let them
go). Only the standard library and aiosmtpd: no imports from the relay.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

LEDGER_HEADER = b"x-ledger-id:"


def ledger_id(content: bytes) -> str | None:
    """The X-Ledger-Id header of a message (headers only; the first one wins)."""
    head = content.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line.lower().startswith(LEDGER_HEADER):
            return line[len(LEDGER_HEADER):].strip().decode("ascii", "replace")
    return None


def body_digest(content: bytes) -> str:
    """SHA-256 of what follows the header block (the relay changes only headers)."""
    _, _, body = content.partition(b"\r\n\r\n")
    return hashlib.sha256(body).hexdigest()


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class Rules:
    def __init__(self, specs: list[str]) -> None:
        self.rcpt: list[tuple[str, str]] = []
        self.data: list[tuple[str, str]] = []
        for spec in specs:
            target, _, reply = spec.partition("=")
            prefix, _, step = target.partition(":")
            if step not in {"rcpt", "data"} or not reply:
                raise SystemExit(f"bad rule {spec!r}: PREFIX:rcpt=REPLY or PREFIX:data=REPLY")
            (self.rcpt if step == "rcpt" else self.data).append((prefix, reply))

    @staticmethod
    def _match(rules: list[tuple[str, str]], addresses: list[str]) -> str | None:
        for prefix, reply in rules:
            if any(a.partition("@")[0].startswith(prefix) for a in addresses):
                return reply
        return None

    def for_rcpt(self, address: str) -> str | None:
        return self._match(self.rcpt, [address])

    def for_data(self, addresses: list[str]) -> str | None:
        return self._match(self.data, addresses)


class Handler:
    def __init__(self, capture: Path, rules: Rules, hold_file: Path | None,
                 hang: bool) -> None:
        self._capture = capture.open("a", encoding="utf-8")
        self._rules = rules
        self._hold_file = hold_file
        self._hang = hang

    def _held(self, ident: str | None) -> bool:
        """Whether the hold file exists and names a prefix of ``ident`` (empty: every id)."""
        if self._hold_file is None:
            return False
        try:
            prefix = self._hold_file.read_text().strip()
        except FileNotFoundError:
            return False
        return (ident or "").startswith(prefix)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        reply = self._rules.for_rcpt(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        ident = ledger_id(content)
        emit(event="data.received", ledger_id=ident, rcpts=len(envelope.rcpt_tos),
             size=len(content))
        reply = self._rules.for_data(list(envelope.rcpt_tos))
        if self._hang or reply == "hang":
            await asyncio.Event().wait()  # took the message, never answers
        while True:  # a file another process removes: polled
            if not self._held(ident):
                break
            await asyncio.sleep(0.02)
        if reply:
            emit(event="data.refused", ledger_id=ident, reply=reply)
            return reply
        record = {"ledger_id": ident, "mail_from": envelope.mail_from,
                  "rcpt_tos": list(envelope.rcpt_tos), "size": len(content),
                  "body_sha256": body_digest(content), "at": time.time()}
        # Written and flushed before the 250: a SIGKILL right after still leaves the line
        # (it is in the kernel's page cache), so the file never misses an accepted message.
        self._capture.write(json.dumps(record) + "\n")
        self._capture.flush()
        return "250 2.0.0 OK queued"


async def serve(args: argparse.Namespace) -> None:
    handler = Handler(Path(args.capture), Rules(args.rule),
                      Path(args.hold_file) if args.hold_file else None, args.data_hang)
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SMTP(handler, hostname="upstream.test", enable_SMTPUTF8=True,
                    data_size_limit=args.max_size, timeout=args.timeout)

    server = await loop.create_server(factory, "127.0.0.1", args.port)
    port = server.sockets[0].getsockname()[1]
    emit(event="upstream.ready", port=port, pid=os.getpid())
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.upstream_proc")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--capture", required=True, help="JSONL file, one line per message")
    parser.add_argument("--rule", action="append", default=[],
                        help="PREFIX:rcpt=REPLY, PREFIX:data=REPLY or PREFIX:data=hang")
    parser.add_argument("--hold-file", help="while this file exists, hold the DATA replies of "
                        "messages whose ledger id starts with its content")
    parser.add_argument("--data-hang", action="store_true",
                        help="take every message and never answer DATA")
    parser.add_argument("--max-size", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--timeout", type=float, default=300)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
