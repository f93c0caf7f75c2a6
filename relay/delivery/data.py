"""Writing a message's DATA to an upstream in large batches, dot-stuffed on the way."""

from __future__ import annotations

import asyncio

import aiosmtplib
import structlog
from aiosmtplib import SMTPStatus

from relay.message.wire import Outgoing

log = structlog.get_logger()


# The body goes out in writes of about this size (small pieces joined, so a message of many
# network-sized pieces costs few system calls), waiting for the transport to drain between
# them: at most one such batch is ever copied, never the whole body.
_WRITE_BATCH = 256 * 1024


async def send_data(client: aiosmtplib.SMTP, message: Outgoing,
                    seconds: float) -> aiosmtplib.SMTPResponse:
    """DATA with a message already in wire form (``relay/message/wire.py``), written in
    batches.

    aiosmtplib's own ``data()`` takes content and makes three copies of it (line-ending
    normalisation, dot-stuffing, the terminator appended) before one big write; the relay's
    message is in wire form already. This uses aiosmtplib's protocol for the commands and
    replies (its locking, its reply parser) and writes the body itself.
    """
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    start = await client.execute_command(b"DATA", timeout=seconds)
    if start.code != SMTPStatus.start_input:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    try:
        async with asyncio.timeout(seconds):
            # Armed before the body goes out, as aiosmtplib does, so an early reply from the
            # upstream (a 5xx mid-DATA) is kept rather than dropped as unsolicited.
            protocol._response_pending = True
            batch: list[bytes | memoryview] = []
            pending = 0
            for chunk in (*message.chunks, b".\r\n"):
                batch.append(chunk)
                pending += len(chunk)
                if pending >= _WRITE_BATCH:
                    protocol.write(batch[0] if len(batch) == 1  # type: ignore[arg-type]
                                   else b"".join(batch))
                    batch, pending = [], 0
                    await protocol._drain_helper()  # returns at once unless writing is paused
            if batch:
                protocol.write(b"".join(batch))
    except TimeoutError:
        client.close()
        raise aiosmtplib.SMTPTimeoutError("Timed out sending the message") from None
    except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
        client.close()
        raise
    try:
        response = await protocol.read_response(timeout=seconds)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()
        raise
    if response.code != SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response

