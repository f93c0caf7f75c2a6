"""aiosmtpd hooks only: SMTP verbs become calls into the services, exceptions become replies
(STYLE §1 steps 2-7, §4).

aiosmtpd finds hooks and AUTH mechanisms by name, so a misspelt one would silently do
nothing; ``tests/smtp/test_hooks.py`` checks this class exposes exactly the names below.
"""

from __future__ import annotations

import asyncio
import binascii
import secrets
import time
from base64 import b64decode
from typing import TYPE_CHECKING

import structlog
from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import MISSING, AuthResult

from relay import errors
from relay.config.zones import UnknownTimeZoneError, zone
from relay.decisions.months import Clock, period_at
from relay.decisions.routing import choose_route
from relay.errors import (
    AuthFailedError,
    AuthRequiredError,
    AuthThrottledError,
    InternalError,
    RelayError,
    RouteRefusedError,
    ShuttingDownError,
    SmtpUtf8RequiredError,
    StoreUnavailableError,
)
from relay.identity.accounts import AccountStore, Principal
from relay.identity.auth import Authenticator
from relay.identity.throttle import AuthThrottle
from relay.message.headers import received_header
from relay.smtp.record import State
from relay.smtp.refusals import finish_refused_mail
from relay.smtp.services import Opened, Services
from relay.smtp.transaction import Transaction

if TYPE_CHECKING:
    from relay.smtp.session import RelayEnvelope, RelaySession, SessionServer

log = structlog.get_logger()


class RelayHandler:
    def __init__(self, *, accounts: AccountStore, services: Services, clock: Clock,
                 hostname: str, default_tz: str, throttle: AuthThrottle | None = None) -> None:
        self.accounts = accounts
        self.throttle = throttle
        # Replaced whole on reload; a transaction keeps the services (and so the Policies)
        # it started with.
        self.services = services
        self._auth = Authenticator(accounts)
        self._clock = clock
        self._hostname = hostname
        self._default_tz = default_tz
        self._retiring: set[asyncio.Task[None]] = set()
        # Deliveries the client's dot started; they may outlive the client's connection.
        self._delivering: set[asyncio.Task[str]] = set()
        # Set when the relay drains (SIGTERM): open transactions may finish, new ones are
        # refused (a client pipelining its next message on a pooled connection, say).
        self.draining = False

    # -- AUTH (RFC 4954) ---------------------------------------------------------------------
    async def auth_PLAIN(self, server: SessionServer, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:  # "*" or bad base64: challenge_auth already replied
                return self._malformed("PLAIN", handled=True)
        else:
            try:
                blob = b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                return self._malformed("PLAIN", message=errors.AUTH_BAD_BASE64)
        parts = blob.split(b"\x00")
        # RFC 4616 §2: [authzid] NUL authcid NUL passwd. Acting as someone else (an authzid
        # different from the login) is not offered.
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            return self._malformed("PLAIN", message=errors.AUTH_BAD_PLAIN)
        return await self._check(server, "PLAIN", parts[1], parts[2])

    async def auth_LOGIN(self, server: SessionServer, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await server.challenge_auth(server.AuthLoginUsernameChallenge)
            if login is MISSING:
                return self._malformed("LOGIN", handled=True)
        else:
            try:
                login = b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                return self._malformed("LOGIN", message=errors.AUTH_BAD_BASE64)
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if password is MISSING:
            return self._malformed("LOGIN", handled=True)
        return await self._check(server, "LOGIN", login, password)

    def _malformed(self, mechanism: str, *, handled: bool = False,
                   message: str | None = None) -> AuthResult:
        self.services.metrics.auth(mechanism, "malformed").inc()
        return AuthResult(success=False, handled=handled, message=message)

    async def _check(self, server: SessionServer, mechanism: str, login: bytes,
                     password: bytes) -> AuthResult:
        session_log = server.session_log
        shown = login.decode("utf-8", "replace")[:100]
        client = server.client_ip or "unknown"  # the real client, after PROXY
        throttle = self.throttle
        metrics = self.services.metrics
        try:
            principal, earlier = await self._auth.check(login, password, throttle, client)
        except AuthThrottledError as exc:
            # Refused without looking at the password: a guesser learns nothing more.
            exc.log_refusal(session_log, "auth.throttled", metrics.auth(mechanism, "throttled"),
                            level="warning", mechanism=mechanism, login=shown,
                            scope=exc.scope, failures=exc.failures)
            server.mark_reply_logged()
            return AuthResult(success=False, handled=False, message=exc.reply)
        except StoreUnavailableError:
            metrics.auth(mechanism, "unavailable").inc()
            session_log.warning("auth.unavailable", mechanism=mechanism, login=shown)
            server.mark_reply_logged()
            return AuthResult(success=False, handled=False, message=errors.AUTH_TEMPORARY)
        if principal is None:
            counts: dict[str, int] = {}
            if throttle is not None:
                try:
                    by_client, by_login = await throttle.record_failure(client, login)
                    counts = {"failures_ip": by_client, "failures_login": by_login}
                except StoreUnavailableError:
                    session_log.warning("auth.throttle_unavailable", login=shown)
            failed = AuthFailedError()
            failed.log_refusal(session_log, "auth.failed", metrics.auth(mechanism, "failed"),
                               level="warning", mechanism=mechanism, login=shown, **counts)
            server.mark_reply_logged()
            return AuthResult(success=False, handled=False, message=failed.reply)
        if earlier and throttle is not None:
            # The owner got in: forget the login's failures (the client's stay counted).
            try:
                await throttle.record_success(login)
            except StoreUnavailableError:
                session_log.warning("auth.throttle_unavailable", login=shown)
        metrics.auth(mechanism, "succeeded").inc()
        session_log.info("auth.succeeded", mechanism=mechanism, login=principal.login,
                         app=principal.app)
        return AuthResult(success=True, handled=False, auth_data=principal,
                          message=errors.AUTH_SUCCESS)

    # -- PROXY protocol (a trusted balancer's header, before the greeting) ------------------
    async def handle_PROXY(self, server: SessionServer, session: RelaySession,
                           envelope: RelayEnvelope, proxy_data: ProxyData) -> bool:
        """True accepts the connection; ``RelaySMTP.accept_proxy`` (relay/smtp/admission.py)
        takes the real client from the header."""
        return server.accept_proxy(proxy_data)

    # -- the transaction ---------------------------------------------------------------------
    async def handle_MAIL(self, server: SessionServer, session: RelaySession,
                          envelope: RelayEnvelope, address: str,
                          mail_options: list[str]) -> str:
        principal: Principal | None = session.auth_data if session.authenticated else None
        session_log = server.session_log
        services = self.services
        metrics = services.metrics
        if self.draining:
            shutting_down = ShuttingDownError()
            shutting_down.log_refusal(session_log, "mail.refused",
                                      metrics.senders("refused", "draining"), reason="draining")
            return shutting_down.reply
        if principal is None:
            refusal = AuthRequiredError()
            refusal.log_refusal(session_log, "mail.refused",
                                metrics.senders("refused", "auth_required"),
                                reason="auth_required")
            return refusal.reply
        mail_log = session_log.bind(login=principal.login, app=principal.app)
        opened: Opened | None = None
        txn_id = secrets.token_hex(8)
        # What the canonical line of a refusal here carries: filled in as it becomes known.
        known = mail_log.bind(txn_id=txn_id,
                              sender_domain=address.rpartition("@")[2].lower())
        mail_started = time.monotonic()
        try:
            if not address.isascii() and not envelope.smtp_utf8:
                raise SmtpUtf8RequiredError()
            started = time.perf_counter()
            try:
                user = await self.accounts.resolve_sender(principal, address)
            except StoreUnavailableError:
                metrics.redis_errors("resolve_sender").inc()
                raise
            metrics.redis_seconds("resolve_sender").observe(time.perf_counter() - started)
            try:
                tz = zone(user.tz)
            except UnknownTimeZoneError:
                tz = zone(self._default_tz)
            period = period_at(self._clock.now(), tz)
            known = known.bind(user_id=user.id, plan=user.plan, period=period.label)
            routing = services.policies.routing
            if not routing.app(principal.app).decided_at_data:
                # The route is known now: open the upstream and mirror each RCPT in step.
                decision = choose_route(routing, app=principal.app,
                                        preference=user.preferences.get(principal.app),
                                        header="")
                known = known.bind(route=decision.route and decision.route.name)
                services.shadow.route(decision, user=user, app=principal.app, header="", log=known)
                if decision.route is None:
                    raise RouteRefusedError(decision.refusal)
                opened = Opened(*await services.routes.begin(
                    decision.route, user, address, mail_options, smtputf8=envelope.smtp_utf8))
        except RelayError as exc:
            exc.log_refusal(mail_log, "mail.refused", metrics.senders("refused", exc.reason),
                            reason=exc.reason, sender_domain=address.rpartition("@")[2].lower())
            finish_refused_mail(known, metrics, exc, started=mail_started)
            return exc.reply
        envelope.txn = Transaction(
            txn_id=txn_id, principal=principal, user=user, sender=address,
            mail_options=list(mail_options), smtputf8=envelope.smtp_utf8, period=period,
            opened=opened, services=services, log=mail_log)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        metrics.senders("accepted", "none").inc()
        envelope.txn.log.debug("mail.accepted")  # delivery.finished is the canonical line
        return errors.SENDER_OK

    async def handle_RCPT(self, server: SessionServer, session: RelaySession,
                          envelope: RelayEnvelope, address: str,
                          rcpt_options: list[str]) -> str:
        txn = envelope.txn
        if txn is None:  # pragma: no cover - aiosmtpd answers 503 before calling us
            return InternalError().reply
        try:
            await txn.add_recipient(address, rcpt_options)
        except RelayError as exc:
            return exc.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return errors.RECIPIENT_OK

    async def handle_DATA(self, server: SessionServer, session: RelaySession,
                          envelope: RelayEnvelope) -> str:
        txn = envelope.txn
        if txn is None or envelope.message is None:  # pragma: no cover
            return InternalError().reply
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        trace = received_header(
            helo=session.host_name or "unknown", peer_ip=peer, hostname=self._hostname,
            protocol="ESMTPSA" if server.tls_active else "ESMTPA", txn_id=txn.txn_id,
            now=self._clock.now())
        # The dot commits the message: the delivery runs in a task of its own, so a client
        # that leaves now (aiosmtpd cancels its connection task) cannot cut the upstream
        # transaction half way. It finishes, and commits or refunds on the real outcome.
        delivery = asyncio.get_running_loop().create_task(
            txn.deliver(envelope.message, trace))
        self._delivering.add(delivery)
        delivery.add_done_callback(self._delivering.discard)
        try:
            await asyncio.shield(delivery)
        except RelayError as exc:
            return exc.reply
        except asyncio.CancelledError:
            # The client left: nobody hears the outcome now (a refusal is the transaction's
            # own, logged by it), but a bug in the delivery must still be logged.
            delivery.add_done_callback(self._log_orphaned_bug)
            raise
        return errors.message_accepted(txn.txn_id)

    def _log_orphaned_bug(self, delivery: asyncio.Task[str]) -> None:
        error = None if delivery.cancelled() else delivery.exception()
        if error is not None and not isinstance(error, RelayError):
            self.services.metrics.session_exceptions.inc()
            log.error("delivery.exception", exc_info=error)

    async def handle_exception(self, error: Exception) -> str:
        # A bug, not a refusal: log the traceback, tell the client only to retry later
        # (aiosmtpd's default would send the exception text to the client).
        self.services.metrics.session_exceptions.inc()
        log.error("session.exception", exc_info=error)
        return InternalError().reply

    # -- ending transactions that did not finish -----------------------------------------------
    def retire(self, txn: Transaction, reason: str) -> None:
        """Abort ``txn`` in its own task, so a cancelled connection task cannot interrupt the
        refund (the shielding STYLE §1 step 7 asks for)."""
        if txn.state is State.DONE:
            return
        task = asyncio.get_running_loop().create_task(txn.abort(reason))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    @property
    def deliveries(self) -> int:
        """Deliveries under way, those whose client has left included."""
        return len(self._delivering)

    async def drain(self, seconds: float | None = None) -> None:
        """Wait for the deliveries under way (up to ``seconds``; the rest are
        cancelled, which leaves their units counted) and for every pending abort (refunds);
        used at shutdown and in tests."""
        if self._delivering:
            _, late = await asyncio.wait(list(self._delivering), timeout=seconds)
            for delivery in late:
                delivery.cancel()
            if late:
                log.warning("relay.deliveries_cut", deliveries=len(late))
                await asyncio.wait(late)
        while self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)


def hook_names() -> set[str]:
    """The aiosmtpd hook and AUTH mechanism names this handler defines."""
    return {name for name in dir(RelayHandler) if name.startswith(("handle_", "auth_"))}

