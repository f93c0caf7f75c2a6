"""Pooled SMTP connections to one upstream, and the session that sends one message on one
of them (aiosmtplib). A pool probes a broken upstream every ``PROBE_INTERVAL`` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from pathlib import Path

import aiosmtplib
import structlog

from relay.config.endpoints import UpstreamTarget
from relay.delivery import envelope
from relay.delivery.data import send_data
from relay.delivery.upstream import reply_class, translate_error
from relay.errors import (
    SmtpUtf8UnsupportedError,
    UpstreamBusyError,
    UpstreamOutcomeUnknownError,
    UpstreamUnavailableError,
)
from relay.message.wire import Outgoing
from relay.observe.metrics import UpstreamMetrics, detached

log = structlog.get_logger()

# MAIL FROM parameters forwarded when the upstream advertises the extension (RFC 1870, 6152,
# 6531). Anything else aiosmtpd accepted has already been validated and is not forwarded.
_FORWARDED_MAIL_PARAMS = {"SIZE": "size", "BODY": "8bitmime", "SMTPUTF8": "smtputf8"}
# While an upstream is not known to be reachable, /readyz and /metrics start a probe
# connection in the background at most this often (seconds), so a relay taken out of service
# for a dead upstream comes back by itself, without traffic, once the upstream does.
PROBE_INTERVAL = 5.0


class SmtpUpstream:
    """A bounded pool of persistent connections to one SMTP upstream."""

    def __init__(self, target: UpstreamTarget, *, size: int, timeout: float,
                 local_hostname: str, tls_verify: bool = True, ca_file: Path | None = None,
                 idle_seconds: float = 60.0, metrics: UpstreamMetrics | None = None) -> None:
        self.name = str(target)
        self._target = target
        self.timeout = timeout
        self._local_hostname = local_hostname
        self._tls_verify = tls_verify
        self._ca_file = str(ca_file) if ca_file else None
        self._idle_seconds = idle_seconds
        self._idle: deque[tuple[aiosmtplib.SMTP, float]] = deque()
        self._slots = asyncio.Semaphore(size)
        self._closed = False
        # For the metrics (pool gauges are read at scrape time) and /readyz.
        self.size = size
        self._held = 0  # slots taken: connections carrying a transaction
        self._reachable: bool | None = None
        self._probe: asyncio.Task[None] | None = None
        self._probed_at = -PROBE_INTERVAL
        self._metrics = metrics or detached().upstream("default")
        self.pool = self._metrics.pool
        self._metrics.track(self)

    @property
    def busy(self) -> int:
        return self._held

    @property
    def idle(self) -> int:
        return len(self._idle)

    def _observe(self, step: str, started: float, exc: BaseException | None) -> None:
        """Count one upstream step: its time, and the class of its reply."""
        metrics = self._metrics
        metrics.duration[step].observe(time.perf_counter() - started)
        kind = "2xx" if exc is None else reply_class(exc)
        if kind is not None:
            metrics.replies[step][kind].inc()

    def reachable(self) -> bool | None:
        """Whether the last connection to the upstream (a message's or a probe's) succeeded;
        None before the first. While that is not True, starts a probe connection in the
        background (at most one every PROBE_INTERVAL seconds)."""
        if self._reachable is not True and self._probe is None and not self._closed \
                and time.monotonic() - self._probed_at >= PROBE_INTERVAL:
            self._probed_at = time.monotonic()
            self._probe = asyncio.get_running_loop().create_task(self._run_probe())
        return self._reachable

    async def _run_probe(self) -> None:
        try:
            client = await self._connect()
        except UpstreamUnavailableError:
            return  # _connect logged it and marked the upstream unreachable
        finally:
            self._probe = None
        try:
            await asyncio.wait_for(client.quit(), 2)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            client.close()

    async def _connect(self) -> aiosmtplib.SMTP:
        t = self._target
        client = aiosmtplib.SMTP(
            hostname=t.host, port=t.port, username=t.username, password=t.password,
            # An explicit name: the default would call socket.getfqdn() (a DNS lookup).
            local_hostname=self._local_hostname, timeout=self.timeout,
            use_tls=t.tls == "implicit", start_tls=t.tls == "starttls",
            validate_certs=self._tls_verify, cert_bundle=self._ca_file)
        started = time.perf_counter()
        try:
            await client.connect()
            if not client.esmtp_extensions:
                # connect() only says EHLO when it needs STARTTLS or AUTH; the extension list
                # (SIZE, 8BITMIME, SMTPUTF8) must be known before the first MAIL FROM.
                await client.ehlo()
        except Exception as exc:
            # Whatever the upstream answers while the connection is being set up (greeting,
            # EHLO, a 5xx to STARTTLS, our own login refused) says nothing about the client's
            # message: the client must keep it and retry, so it is always temporary.
            client.close()
            self._reachable = False
            self._metrics.up.set(0)
            self._observe("connect", started, exc)
            log.warning("upstream.connect_failed", upstream=self.name,
                        error=type(exc).__name__, detail=str(exc)[:200])
            raise UpstreamUnavailableError() from exc
        self._reachable = True
        self._metrics.up.set(1)
        self._observe("connect", started, None)
        return client

    def _take_idle(self) -> aiosmtplib.SMTP | None:
        now = time.monotonic()
        while self._idle:
            client, since = self._idle.pop()  # most recently used first: the warmest
            if client.is_connected and now - since < self._idle_seconds:
                return client
            client.close()
        return None

    async def begin(self, sender: str, options: list[str], *, smtputf8: bool) -> SmtpSession:
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout)
        except TimeoutError:
            # Nothing was asked of the upstream: it is the pool that is full, not the upstream
            # that is down (451 4.4.5, and no failover, which is for an unreachable one).
            self._metrics.pool_timeouts.inc()
            raise UpstreamBusyError() from None
        self._held += 1
        try:
            client = self._take_idle()
            try:
                if client is not None:
                    try:
                        await self._mail(client, sender, options, smtputf8)
                        self._observe("mail", started, None)
                        return SmtpSession(self, client)
                    except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                        # An idle connection the upstream dropped: nothing was sent on it,
                        # so a fresh connection is safe.
                        client.close()
                client = await self._connect()
                await self._mail(client, sender, options, smtputf8)
                self._observe("mail", started, None)
                return SmtpSession(self, client)
            except BaseException as exc:
                if client is not None:
                    client.close()
                if isinstance(exc, Exception):
                    self._observe("mail", started, exc)
                    raise translate_error(exc) from exc
                raise
        except BaseException:
            self._release_slot()
            raise

    async def _mail(self, client: aiosmtplib.SMTP, sender: str, options: list[str],
                    smtputf8: bool) -> None:
        if smtputf8 and not client.supports_extension("smtputf8"):
            raise SmtpUtf8UnsupportedError()
        forwarded = [opt for opt in options
                     if client.supports_extension(_FORWARDED_MAIL_PARAMS.get(
                         opt.partition("=")[0], "-"))]
        await envelope.mail(client, sender, forwarded, "utf-8" if smtputf8 else "ascii")

    def _give_back(self, client: aiosmtplib.SMTP | None) -> None:
        if client is not None:
            if self._closed:
                client.close()
            else:
                self._idle.append((client, time.monotonic()))
        self._release_slot()

    def _release_slot(self) -> None:
        self._held -= 1
        self._slots.release()

    async def close(self) -> None:
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        while self._idle:
            client, _ = self._idle.pop()
            try:
                await asyncio.wait_for(client.quit(), 2)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()


class SmtpSession:
    def __init__(self, pool: SmtpUpstream, client: aiosmtplib.SMTP) -> None:
        self._pool = pool
        self._client = client
        self._released = False
        # After a 250 to DATA the upstream's transaction is over (RFC 5321 §4.1.1.4): the
        # connection is reusable as it is, without an RSET round trip.
        self._delivered = False
        # True while an upstream command is outstanding: a connection cut mid-command is in an
        # unknown protocol state and is closed rather than reused.
        self._busy = False

    async def rcpt(self, address: str, options: list[str]) -> None:
        self._busy = True
        started = time.perf_counter()
        try:
            await envelope.rcpt(self._client, address, options,
                                "utf-8" if not address.isascii() else "ascii")
        except Exception as exc:
            self._pool._observe("rcpt", started, exc)
            raise translate_error(exc) from exc
        finally:
            self._busy = False
        self._pool._observe("rcpt", started, None)

    async def data(self, message: Outgoing) -> str:
        self._busy = True
        started = time.perf_counter()
        try:
            response = await send_data(self._client, message, self._pool.timeout)
        except aiosmtplib.SMTPResponseException as exc:
            self._pool._observe("data", started, exc)
            raise translate_error(exc) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self._pool._observe("data", started, exc)
            raise UpstreamOutcomeUnknownError() from exc
        finally:
            self._busy = False
        self._pool._observe("data", started, None)
        self._delivered = True
        return response.message

    async def release(self, *, reusable: bool) -> None:
        if self._released:
            return
        self._released = True
        client: aiosmtplib.SMTP | None = self._client
        if self._busy or not reusable:
            self._client.close()
            client = None
        elif not self._delivered:
            try:
                await self._client.rset()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                self._client.close()
                client = None
        self._pool._give_back(client)

