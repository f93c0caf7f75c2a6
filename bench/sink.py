"""A minimal counting SMTP sink, used only when Postfix's C ``smtp-sink`` is unavailable.

``python -m bench.sink --port P`` accepts every command (AUTH included), throws messages
away and prints the same running counter as ``smtp-sink -c`` (``... mesg=N`` ending in CR),
so ``bench.procs.Sink`` reads both alike. Much slower than smtp-sink: results taken with it
say so.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import cast

from bench.loadgen import new_event_loop

_EHLO = (b"250-sink.bench.invalid\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 0\r\n"
         b"250-AUTH PLAIN LOGIN\r\n250 ENHANCEDSTATUSCODES\r\n")


class _Counter:
    messages = 0

    def add(self) -> None:
        self.messages += 1
        sys.stdout.write(f"sess=0 quit=0 mesg={self.messages}\r")
        sys.stdout.flush()


class SinkProtocol(asyncio.Protocol):
    def __init__(self, counter: _Counter) -> None:
        self.counter = counter
        self.buffer = b""
        self.in_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(b"220 sink.bench.invalid ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while True:
            if self.in_data:
                if self.buffer.startswith(b".\r\n"):
                    end = 0
                else:
                    end = self.buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        # Keep only what could still hold the start of the terminator.
                        self.buffer = self.buffer[-4:]
                        return
                    end += 2
                self.buffer = self.buffer[end + 3:]
                self.in_data = False
                self.counter.add()
                self.transport.write(b"250 2.0.0 Ok: queued\r\n")
                continue
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                return
            self.buffer = rest
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(_EHLO)
            elif verb == b"DATA":
                self.in_data = True
                self.transport.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"AUTH":
                self.transport.write(b"235 2.7.0 Authentication successful\r\n")
            elif verb == b"QUIT":
                self.transport.write(b"221 2.0.0 Bye\r\n")
                self.transport.close()
                return
            else:
                self.transport.write(b"250 2.0.0 Ok\r\n")


async def serve(port: int) -> None:
    counter = _Counter()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(counter), "127.0.0.1", port,
                                      backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sink")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(args.port))
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
