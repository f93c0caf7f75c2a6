"""A line-level SMTP client over a real socket, for input no library would send (bad
commands, PROXY headers, half a DATA body)."""

from __future__ import annotations

import asyncio
import base64

from tests.conftest import PASSWORD


class RawSMTP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, first: bytes = b"",
                      source: str = "127.0.0.1") -> RawSMTP:
        """Connected from ``source``, ``first`` written (a PROXY header, say); no reply read."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=(source, 0))
        raw = cls(reader, writer)
        if first:
            writer.write(first)
            await writer.drain()
        return raw

    @classmethod
    async def open(cls, port: int) -> RawSMTP:
        """Connected, with the 220 greeting read."""
        raw = await cls.connect(port)
        assert (await raw.reply()).startswith("220 ")
        return raw

    async def reply(self) -> str:
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 10)).decode()
            lines.append(line.rstrip("\r\n"))
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    async def send(self, raw: bytes) -> str:
        self.writer.write(raw)
        await self.writer.drain()
        return await self.reply()

    async def login(self, helo: str = "raw.test") -> None:
        assert (await self.send(f"EHLO {helo}\r\n".encode())).startswith("250")
        token = base64.b64encode(b"\0agent@kw.test\0" + PASSWORD.encode())
        assert (await self.send(b"AUTH PLAIN " + token + b"\r\n")).startswith("235")

    async def rest(self) -> bytes:
        """Everything until the relay closes the connection."""
        return await asyncio.wait_for(self.reader.read(), 10)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass
