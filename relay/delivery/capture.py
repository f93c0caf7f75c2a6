"""The development upstream: every accepted message written as a file in a folder."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import structlog

from relay.errors import (
    UpstreamUnavailableError,
)
from relay.message.wire import Outgoing

log = structlog.get_logger()


class CaptureUpstream:
    """Development default: each message lands in ``directory`` as one ``.eml`` file."""

    def __init__(self, directory: Path) -> None:
        self.name = f"capture:{directory}"
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    async def begin(self, sender: str, options: list[str], *,
                    smtputf8: bool) -> CaptureSession:
        return CaptureSession(self._directory)

    def reachable(self) -> bool:
        return os.access(self._directory, os.W_OK)

    async def close(self) -> None:
        return None


class CaptureSession:
    def __init__(self, directory: Path) -> None:
        self._directory = directory

    async def rcpt(self, address: str, options: list[str]) -> None:
        return None

    async def data(self, message: Outgoing) -> str:
        content = message.content()
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{time.monotonic_ns()}.eml"
        try:
            await asyncio.to_thread(_write_atomically, self._directory / name, content)
        except OSError as exc:
            log.error("capture.write_failed", path=str(self._directory), error=str(exc))
            raise UpstreamUnavailableError("Capture folder not writable, try again later") \
                from exc
        return name

    async def release(self, *, reusable: bool) -> None:
        return None


def _write_atomically(path: Path, content: bytes) -> None:
    # Write then rename, so a reader never sees half a message.
    partial = path.with_suffix(".part")
    partial.write_bytes(content)
    partial.replace(path)

